"""One table and one plot for a sweep: accuracy (and robustness) against gamma, per architecture.

uv run kwta-summarize outputs/train/multiruns/<sweep>
uv run kwta-summarize <sweep or run dirs...> outputs/attack/runs --out DIR

Reads every run folder found (one holding .hydra/config.yaml: the config, metrics.json, or the
error.txt of a failed sweep job) and every attack report.json found, matched to its run by the
checkpoint it attacked. Writes summary.csv, summary.md and gamma_vs_accuracy.png.
"""

import argparse
import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from kwta_lightning.core.activations import activation_label, uses_gamma
from kwta_lightning.errors import KWTAError
from kwta_lightning.run.console import markdown_table, rich_console
from kwta_lightning.run.jobs import ERROR_FILE

Row = dict[str, Any]

COLUMNS = ["job", "model", "act", "gamma", "data", "seed", "epochs", "val_acc_best", "test_acc"]
TRAILING = ["status", "error", "output_dir"]
PLOT = "gamma_vs_accuracy.png"


def _is_training_run(config: Path) -> bool:
    """attack.py, landscape and toy1d runs have .hydra/ folders too; only train.py's are rows."""
    return OmegaConf.load(config).get("task_name", "train") == "train"


def find_inputs(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """Run folders and attack reports in or under ``paths`` (each a folder or a report.json)."""
    runs: list[Path] = []
    reports: list[Path] = []
    for path in paths:
        if not path.exists():
            raise KWTAError(f"{path} does not exist")
        if path.is_file():
            if path.suffix != ".json":
                raise KWTAError(f"{path} is neither a run folder, a sweep folder nor a report.json")
            reports.append(path)
            continue
        configs = path.rglob(".hydra/config.yaml")
        runs += sorted(c.parent.parent for c in configs if _is_training_run(c))
        reports += sorted(path.rglob("report.json"))
    if not runs:
        given = ", ".join(str(p) for p in paths)
        raise KWTAError(f"no run folders (with .hydra/config.yaml) in {given}")
    return list(dict.fromkeys(runs)), list(dict.fromkeys(reports))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise KWTAError(f"cannot read {path}: {err}") from err


def load_run(run_dir: Path, root: Path | None) -> Row:
    """One row: the run's config, its metrics, and its error if it failed."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    name, options = OmegaConf.select(cfg, "act.name"), OmegaConf.select(cfg, "act.options")
    options = None if options is None else OmegaConf.to_container(options)
    job = str(run_dir.relative_to(root)) if root and run_dir != root else run_dir.name
    row: Row = {
        "job": job,
        "model": OmegaConf.select(cfg, "model.backbone"),
        "act": activation_label(name, options),
        "gamma": OmegaConf.select(cfg, "gamma") if uses_gamma(name, options) else None,
        "data": OmegaConf.select(cfg, "data.name"),
        "seed": OmegaConf.select(cfg, "seed"),
        "output_dir": str(run_dir.resolve()),
    }
    metrics_file, error_file = run_dir / "metrics.json", run_dir / ERROR_FILE
    if metrics_file.is_file():
        metrics = _read_json(metrics_file)
        row |= {k: metrics.get(k) for k in ("epochs", "val_acc_best", "test_acc")}
        row["status"] = "ok"
    elif error_file.is_file():
        first = error_file.read_text().partition("\n")[0]
        row |= {"status": "failed", "error": first.removeprefix("error: ")}
    else:
        row["status"] = "no metrics.json (running or killed)"
    return row


def robust_columns(report: dict[str, Any], path: Path) -> dict[str, float]:
    """Robust accuracy per attack, norm and eps, and the worst case over attacks per eps."""
    try:
        columns = {
            f"{r['attack']} {r['norm']} eps={r['eps']:g}": r["robust_acc"]
            for r in report["results"]
        }
        columns |= {f"worst eps={v['eps']:g}": v["robust_acc"] for v in report["verdict"]}
    except (KeyError, TypeError, ValueError) as err:
        raise KWTAError(f"{path} is not an attack report (bad or missing field {err})") from err
    return columns


def attach_reports(rows: list[Row], reports: Sequence[Path]) -> list[str]:
    """Add each report's robust accuracies to the row of the run whose checkpoint it attacked.

    Returns the robust columns in order of appearance.
    """
    by_dir = {Path(row["output_dir"]): row for row in rows}
    added: dict[str, None] = {}
    for path in reports:
        report = _read_json(path)
        if "checkpoint" not in report:
            raise KWTAError(f"{path} is not an attack report (no 'checkpoint')")
        checkpoint = Path(report["checkpoint"]).resolve()
        row = next((by_dir[d] for d in checkpoint.parents if d in by_dir), None)
        if row is None:
            print(f"note: {path}: its checkpoint {checkpoint} is in none of the runs given")
            continue
        columns = robust_columns(report, path)
        row |= columns
        added |= dict.fromkeys(columns)
    return list(added)


def summarize(paths: Sequence[Path], out: Path) -> list[Row]:
    """Write summary.csv, summary.md and the plot into ``out``; return the rows."""
    runs, reports = find_inputs(paths)
    root = paths[0] if len(paths) == 1 and paths[0].is_dir() else None
    rows = sorted(
        (load_run(run, root) for run in runs),
        key=lambda r: (
            str(r["model"]),
            r["act"] != "relu",
            str(r["act"]),
            r["gamma"] or 0.0,
            r["job"],
        ),
    )
    robust = attach_reports(rows, reports)
    out.mkdir(parents=True, exist_ok=True)
    columns = COLUMNS + robust + TRAILING
    _write_csv(rows, columns, out / "summary.csv")
    _write_markdown(rows, COLUMNS + robust + ["status"], out / "summary.md")
    figure(rows, robust).savefig(out / PLOT, dpi=110)
    _print_table(rows, COLUMNS[1:] + robust + ["status"])
    print(f"summary of {len(rows)} runs: {out / 'summary.csv'}, {out / 'summary.md'}, {out / PLOT}")
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _write_csv(rows: list[Row], columns: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_markdown(rows: list[Row], columns: list[str], path: Path) -> None:
    table = []
    for row in rows:
        cells = [_cell(row.get(c)) for c in columns]
        if row["status"] == "failed":
            cells[-1] = f"failed: {row['error']}"
        table.append(cells)
    path.write_text("\n".join(markdown_table(columns, table)) + "\n")


def _print_table(rows: list[Row], columns: list[str]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    rich_console().print(table)


def _accuracy(row: Row, metric: str) -> float | None:
    """``metric`` of a row; "clean" is the test accuracy (the best val accuracy without test)."""
    if metric == "clean":
        return row["test_acc"] if row.get("test_acc") is not None else row.get("val_acc_best")
    return row.get(metric)


def _mean_by(rows: Iterable[Row], key: str, metric: str) -> dict[Any, float]:
    """Mean of ``metric`` per value of ``key`` (several seeds give one point)."""
    values: dict[Any, list[float]] = defaultdict(list)
    for row in rows:
        value = _accuracy(row, metric)
        if value is not None:
            values[row[key]].append(value)
    return {k: sum(v) / len(v) for k, v in sorted(values.items())}


def figure(rows: list[Row], robust: list[str]) -> Figure:
    """Accuracy against gamma: one panel for clean accuracy and one per robust column.

    One line per architecture (and activation), ReLU runs as dashed horizontal lines.
    """
    done = [r for r in rows if r["status"] == "ok"]
    panels = ["clean", *robust]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.8 * nrows), layout="constrained")  # room for the title
    axes = fig.subplots(nrows, ncols, squeeze=False)
    lines = sorted({(r["model"], r["act"]) for r in done if r["act"] != "relu"})
    models = sorted({r["model"] for r in done})
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    gammas = sorted({r["gamma"] for r in done if r["gamma"] is not None})
    for ax, metric in zip(axes.flat, panels, strict=False):
        for model, act in lines:
            points = _mean_by(
                (r for r in done if (r["model"], r["act"]) == (model, act)), "gamma", metric
            )
            if points:
                label = model if act == "kwta" else f"{model} ({act})"
                ax.plot(list(points), list(points.values()), "o-", color=colors[model], label=label)
        baselines = _mean_by((r for r in done if r["act"] == "relu"), "model", metric)
        for model, acc in baselines.items():
            ax.axhline(acc, color=colors[model], linestyle="--", label=f"{model} ReLU")
        ax.set_title("clean accuracy" if metric == "clean" else f"robust accuracy, {metric}")
        ax.set_xlabel("gamma (k-WTA sparsity ratio)")
        ax.set_ylabel("accuracy")
        if gammas:
            ax.set_xscale("log")
            ax.set_xticks(gammas, [f"{g:g}" for g in gammas])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    data = sorted({str(r["data"]) for r in done})
    fig.suptitle(f"accuracy against gamma ({', '.join(data)}, {len(done)} runs)")
    return fig


class SweepSummary(Callback):
    """Hydra callback: at the end of a sweep, say which jobs failed and summarise the sweep.

    The sweep then exits with status 1 when a job failed (Hydra itself exits 0 either way).
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = sorted(sweep_dir.rglob(ERROR_FILE))
        jobs = len(list(sweep_dir.rglob(".hydra/config.yaml")))
        if failed:
            logs = ", ".join(str(f.parent / f"{config.hydra.job.name}.log") for f in failed)
            print(f"sweep: {len(failed)} of {jobs} jobs failed; their logs: {logs}")
            for error in failed:
                first = error.read_text().partition("\n")[0].removeprefix("error: ")
                print(f"sweep: failed job {error.parent.relative_to(sweep_dir)}: {first}")
        else:
            print(f"sweep: all {jobs} jobs finished")
        try:
            summarize([sweep_dir], sweep_dir)
        except KWTAError as err:
            print(f"sweep: no summary ({err})")
        if failed:
            print(
                f"sweep: to rerun only the jobs that did not finish, run the same command with "
                f"hydra.sweep.dir={sweep_dir}"
            )
            raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kwta-summarize", description=__doc__.split("\n")[0])
    parser.add_argument(
        "paths", nargs="+", type=Path, help="sweep folders, run folders, attack report.json files"
    )
    parser.add_argument(
        "--out", type=Path, help="where to write the summary (default: the first folder given)"
    )
    args = parser.parse_args(argv)
    out = args.out or next((p for p in args.paths if p.is_dir()), Path("."))
    summarize(args.paths, out)
