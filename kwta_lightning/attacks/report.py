"""The evaluation report: report.json, outcomes.json, report.md, robust_accuracy.png,
examples.png, the console tables, and the same on W&B beside the training run. The verdict comes
first everywhere: it is the number to quote."""

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from rich.table import Table

from kwta_lightning.attacks.base import AttackResult
from kwta_lightning.attacks.evaluate import Evaluation
from kwta_lightning.attacks.store import outcomes
from kwta_lightning.run.console import markdown_table, rich_console
from kwta_lightning.run.loggers import quiet_wandb, saved_run_id, wandb_mode

log = logging.getLogger(__name__)

COLUMNS = (
    "attack",
    "kind",
    "norm",
    "eps",
    "robust_acc",
    "n_robust",
    "success_rate",
    "median_norm",
    "wall_time_s",
    "images_per_s",
)


def training_run(ckpt_path: str | Path) -> dict[str, Any]:
    """The train.py run a checkpoint came from: folder, W&B project, group and run id, if known."""
    run_dir = Path(ckpt_path).resolve().parent.parent
    info: dict[str, Any] = {
        "dir": None,
        "wandb_project": None,
        "wandb_group": None,
        "wandb_id": None,
    }
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        return info
    info["dir"] = str(run_dir)
    cfg = OmegaConf.load(config)
    for key in ("project", "group"):
        info[f"wandb_{key}"] = OmegaConf.select(
            cfg, f"logger.wandb.{key}", default=None, throw_on_resolution_failure=False
        )
    info["wandb_id"] = saved_run_id(run_dir)
    return info


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _row_cells(row: Mapping[str, Any]) -> list[str]:
    return [
        row["attack"],
        row["kind"],
        row["norm"],
        _fmt(row["eps"]),
        _pct(row["robust_acc"]),
        str(row["n_robust"]),
        _pct(row["success_rate"]),
        _fmt(row["median_norm"]),
        _fmt(row["wall_time_s"]),
        _fmt(row["images_per_s"]),
    ]


def verdict_lines(summary: Mapping[str, Any]) -> list[str]:
    """One line per norm and eps: the worst case to quote, and whether masking is suspected."""
    lines = []
    for v in summary["verdict"]:
        masking = "MASKING SUSPECTED" if v["masking_suspected"] else "no sign of masking"
        lines.append(
            f"{v['norm']} eps={_fmt(v['eps'])}: robust accuracy {_pct(v['robust_acc'])} "
            f"({v['n_robust']}/{v['n']}, worst case over {len(v['attacks'])} attacks, strongest "
            f"{v['strongest_attack']}); {masking}"
        )
        lines += [f"    - {reason}" for reason in v["reasons"]]
    return lines


def markdown(summary: Mapping[str, Any]) -> str:
    """report.md: the verdict, what was attacked, the results table, the diagnostics."""
    gamma = "" if summary["gamma"] is None else f" gamma={summary['gamma']}"
    state = "" if summary["complete"] else " (INCOMPLETE: the run stopped or is still running)"
    lines = [
        f"# Robustness of {summary['model']} {summary['activation']}{gamma} on {summary['data']}"
        + state,
        "",
        "## Verdict",
        "",
        *[
            f"- {line.strip()}" if not line.startswith(" ") else f"  {line}"
            for line in verdict_lines(summary)
        ],
        "",
        f"Checkpoint: `{summary['checkpoint']}`  ",
        f"{summary['n_samples']} test images (seed {summary['seed']}), device {summary['device']}, "
        f"clean accuracy {_pct(summary['clean_acc'])}, {summary['wall_time_s']} s in all.",
        "",
        "## Attacks",
        "",
        *markdown_table(COLUMNS, (_row_cells(r) for r in summary["results"])),
        "",
        "## Diagnostics",
        "",
    ]
    lines += [f"- **{d['status']}** {d['name']}: {d['detail']}" for d in summary["diagnostics"]]
    lines += ["", "## Attack hyper-parameters", ""]
    params = {r["attack"]: r["params"] for r in summary["results"]}
    lines += [f"- {name}: `{json.dumps(p)}`" for name, p in params.items()]
    return "\n".join(lines) + "\n"


def plot_robust_accuracy(summary: Mapping[str, Any], path: Path) -> None:
    """Robust accuracy against eps, one line per attack and the worst case, one panel per norm."""
    norms = list(dict.fromkeys(r["norm"] for r in summary["results"]))
    fig = Figure(figsize=(6 * len(norms), 4.5))
    axes = fig.subplots(1, len(norms), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=True):
        rows = [r for r in summary["results"] if r["norm"] == norm]
        for attack in dict.fromkeys(r["attack"] for r in rows):
            points = sorted((r["eps"], r["robust_acc"]) for r in rows if r["attack"] == attack)
            ax.plot(*zip(*points, strict=True), marker="o", label=attack)
        worst = sorted((v["eps"], v["robust_acc"]) for v in summary["verdict"] if v["norm"] == norm)
        if worst:
            ax.plot(*zip(*worst, strict=True), "k--", marker="s", linewidth=2, label="worst case")
        ax.axhline(summary["clean_acc"], color="grey", linewidth=0.8, label="clean")
        ax.set(xlabel=f"eps ({norm})", ylabel="robust accuracy", ylim=(-0.02, 1.02))
        ax.set_title(f"{summary['model']} {summary['activation']} on {summary['data']}, {norm}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _image(x: torch.Tensor):
    return x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)


def plot_examples(
    evaluation: Evaluation, results: Sequence[AttackResult], labels: torch.Tensor, path: Path
) -> None:
    """Clean images, then each attack's adversarial images at its largest eps below 1.

    Titles are predictions, red when wrong."""
    chosen: dict[str, Any] = {}
    for r in results:
        best = chosen.get(r.attack)
        if best is None or (r.eps < 1 and (best.eps >= 1 or r.eps > best.eps)):
            chosen[r.attack] = r
    rows = [("clean", evaluation.clean_examples, evaluation.clean_preds)]
    rows += [(f"{a} eps={r.eps:g}", r.examples, r.example_preds) for a, r in chosen.items()]
    n = len(evaluation.clean_examples)
    fig = Figure(figsize=(1.3 * n, 1.4 * len(rows)))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, (title, images, preds) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(_image(images[j]).numpy(), cmap="gray", vmin=0, vmax=1)
            wrong = int(preds[j]) != int(labels[j])
            ax.set_title(str(int(preds[j])), color="red" if wrong else "green", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _write_text(path: Path, text: str) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write(
    summary: Mapping[str, Any],
    evaluation: Evaluation,
    results: Sequence[AttackResult],
    labels: torch.Tensor,
    indices: Sequence[int],
    out: Path,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    per_input = outcomes(summary, indices, evaluation.clean_correct, results)
    _write_text(out / "outcomes.json", json.dumps(per_input) + "\n")
    _write_text(out / "report.md", markdown(summary))
    if results:
        plot_robust_accuracy(summary, out / "robust_accuracy.png")
    if results and len(evaluation.clean_examples):  # merged reports keep no images
        plot_examples(evaluation, results, labels, out / "examples.png")


def print_console(summary: Mapping[str, Any], out: Path) -> None:
    """The results and the worst case as a rich table, the diagnostics, where the report is."""
    table = Table(title=f"clean accuracy {_pct(summary['clean_acc'])} on {summary['n_samples']}")
    for column in COLUMNS:
        table.add_column(
            column, justify="left" if column in ("attack", "kind", "norm") else "right"
        )
    for row in summary["results"]:
        table.add_row(*_row_cells(row))
    for v in summary["verdict"]:
        table.add_row(
            "worst_case",
            "",
            v["norm"],
            _fmt(v["eps"]),
            _pct(v["robust_acc"]),
            str(v["n_robust"]),
            style="bold",
        )
    console = rich_console()
    console.print("[bold]verdict[/bold]", highlight=False)
    for line in verdict_lines(summary):
        console.print(line, highlight=False, markup=False)
    console.print(table)
    for d in summary["diagnostics"]:
        colour = "green" if d["status"] == "pass" else "yellow"
        console.print(f"[{colour}]{d['status']}[/{colour}] {d['name']}: {d['detail']}")
    print(f"report: {out / 'report.md'}")


def log_wandb(
    summary: Mapping[str, Any], out: Path, mode: str, project: str | None, group: str | None
) -> None:
    """The table, plot and images on W&B, in the training run's project and group."""
    mode = wandb_mode(mode)
    if mode == "disabled":
        return
    import wandb

    train = summary["training_run"]
    run = wandb.init(
        project=project or train["wandb_project"] or "kwta-lightning",
        group=group or train["wandb_group"],
        job_type="attack",
        name=f"attack-{summary['model']}-{summary['activation']}-{summary['data']}",
        config={k: v for k, v in summary.items() if k not in ("results", "verdict", "diagnostics")}
        | {"train_run_id": train["wandb_id"]},
        dir=str(out),
        mode=mode,
        settings=quiet_wandb(),
    )
    try:
        rows = [[r[c] for c in COLUMNS] for r in summary["results"]]
        verdict_columns = ["norm", "eps", "robust_acc", "n_robust", "n", "masking_suspected"]
        run.log(
            {
                "verdict": wandb.Table(
                    columns=[*verdict_columns, "reasons"],
                    data=[
                        [v[c] for c in verdict_columns] + ["; ".join(v["reasons"])]
                        for v in summary["verdict"]
                    ],
                ),
                "results": wandb.Table(columns=list(COLUMNS), data=rows),
                "diagnostics": wandb.Table(
                    columns=["name", "status", "detail"],
                    data=[[d["name"], d["status"], d["detail"]] for d in summary["diagnostics"]],
                ),
                "robust_accuracy": wandb.Image(str(out / "robust_accuracy.png")),
                "examples": wandb.Image(str(out / "examples.png")),
            }
        )
        run.summary["clean_acc"] = summary["clean_acc"]
        for v in summary["verdict"]:
            run.summary[f"verdict/{v['norm']}/eps={v['eps']}/robust_acc"] = v["robust_acc"]
            run.summary[f"verdict/{v['norm']}/eps={v['eps']}/masking"] = v["masking_suspected"]
    finally:
        run.finish()
