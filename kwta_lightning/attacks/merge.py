"""Merge attack reports of one checkpoint into one worst case, per input.

uv run kwta-merge outputs/attack/runs/A outputs/attack/runs/B --out DIR

Reads each folder's report.json and outcomes.json, keeps the test images every report attacked
(by test-set index), and writes a report whose verdict is the per-input worst case over every
attack of every report. The checks that read outcomes alone are recomputed; those that needed the
model (eps=1 PGD, vanishing gradients, PGD convergence, AutoAttack's checks) are carried over.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from kwta_lightning.attacks import report
from kwta_lightning.attacks.base import AttackResult
from kwta_lightning.attacks.diagnostics import Diagnostic, result_checks, verdict
from kwta_lightning.attacks.evaluate import Evaluation, result_rows
from kwta_lightning.attacks.store import from_bits
from kwta_lightning.errors import KWTAError

RECOMPUTED = ("monotonic/", "pgd_vs_fgsm/", "white_box_vs_adaptive/", "deepfool_at_eps/")


def _read(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KWTAError(f"{path} does not exist (not an attack report folder?)") from None
    except json.JSONDecodeError as err:
        raise KWTAError(f"{path} is not valid JSON ({err})") from None


def _results(outcome: dict[str, Any], keep: list[int], taken: set[str]) -> list[AttackResult]:
    """The outcome file's results on the inputs ``keep`` (positions), renamed where a name is
    already taken by an earlier report."""
    results = []
    for r in outcome["results"]:
        name = r["attack"]
        while (name, r["norm"], r["eps"]) in taken:
            name += "+"
        taken.add((name, r["norm"], r["eps"]))
        results.append(
            AttackResult(
                attack=name,
                norm=r["norm"],
                kind=r["kind"],
                eps=r["eps"],
                robust=from_bits(r["robust"])[keep],
                norms=torch.tensor(r["norms"])[keep],
                extra={},
                wall_time_s=r["wall_time_s"],
                examples=torch.zeros(0),
                example_preds=torch.zeros(0, dtype=torch.long),
            )
        )
    return results


def merge(folders: list[Path], out: Path, tolerance: float = 0.01) -> dict[str, Any]:
    reports = [_read(f, "report.json") for f in folders]
    outcomes = [_read(f, "outcomes.json") for f in folders]
    shas = {o["checkpoint_sha256"] for o in outcomes}
    if len(shas) > 1:
        raise KWTAError("the reports attacked different checkpoints; merge reports of one only")
    common = set(outcomes[0]["indices"]).intersection(*(o["indices"] for o in outcomes[1:]))
    if not common:
        raise KWTAError("the reports share no test image; attack the same n_samples and seed")
    indices = [i for i in outcomes[0]["indices"] if i in common]
    results: list[AttackResult] = []
    taken: set[tuple[str, str, float]] = set()
    params: dict[str, Any] = {}
    for rep, outcome in zip(reports, outcomes, strict=True):
        position = {index: p for p, index in enumerate(outcome["indices"])}
        keep = [position[i] for i in indices]
        mine = _results(outcome, keep, taken)
        own = {row["attack"]: row["params"] for row in rep["results"]}
        for original, r in zip(outcome["results"], mine, strict=True):
            params[r.attack] = own.get(original["attack"], {})
        results += mine
    first = outcomes[0]
    clean_correct = from_bits(first["clean_correct"])[[first["indices"].index(i) for i in indices]]
    carried = {
        (d["name"], d["detail"]): Diagnostic(**d)
        for rep in reports
        for d in rep["diagnostics"]
        if not d["name"].startswith(RECOMPUTED)
    }
    diagnostics = [*carried.values(), *result_checks(results, clean_correct, tolerance)]
    summary = dict(reports[0]) | {
        "merged_from": [str(f) for f in folders],
        "n_samples": len(indices),
        "clean_acc": int(clean_correct.sum()) / len(indices),
        "complete": all(r.get("complete", True) for r in reports),
        "verdict": verdict(results, clean_correct, diagnostics),
        "results": result_rows(results, clean_correct, params),
        "diagnostics": [d.as_dict() for d in diagnostics],
        "wall_time_s": round(sum(r["wall_time_s"] or 0 for r in reports), 1),
    }
    evaluation = Evaluation(clean_correct, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    report.write(summary, evaluation, results, torch.zeros(0), indices, out)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kwta-merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="attack report folders")
    parser.add_argument("--out", type=Path, required=True, help="folder of the merged report")
    parser.add_argument("--tolerance", type=float, default=0.01)
    args = parser.parse_args(argv)
    try:
        summary = merge(args.reports, args.out, args.tolerance)
    except KWTAError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    report.print_console(summary, args.out)
