"""The evaluation report: report.json, report.md, robust_accuracy.png, examples.png, the console
tables, and the same on W&B beside the training run."""

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from kwta_lightning.attacks.evaluate import Evaluation  # noqa: E402
from kwta_lightning.loggers import wandb_mode  # noqa: E402

log = logging.getLogger(__name__)

COLUMNS = (
    "attack",
    "kind",
    "norm",
    "eps",
    "robust_acc",
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
    runs = sorted((run_dir / "wandb").glob("*run-*-*"))
    if runs:
        info["wandb_id"] = runs[-1].name.rsplit("-", 1)[1]
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
        _pct(row["success_rate"]),
        _fmt(row["median_norm"]),
        _fmt(row["wall_time_s"]),
        _fmt(row["images_per_s"]),
    ]


def markdown(summary: Mapping[str, Any]) -> str:
    """report.md: what was attacked, the results table, the worst case, the diagnostics."""
    gamma = "" if summary["gamma"] is None else f" gamma={summary['gamma']}"
    lines = [
        f"# Robustness of {summary['model']} {summary['activation']}{gamma} on {summary['data']}",
        "",
        f"Checkpoint: `{summary['checkpoint']}`  ",
        f"{summary['n_samples']} test images (seed {summary['seed']}), device {summary['device']}, "
        f"clean accuracy {_pct(summary['clean_acc'])}, {summary['wall_time_s']} s in all.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in summary["results"]]
    lines += [
        "",
        "Worst case over the attacks run (per input: robust only if every attack fails):",
        "",
    ]
    lines += ["| norm | eps | robust_acc | attacks |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {w['norm']} | {_fmt(w['eps'])} | {_pct(w['robust_acc'])} | {', '.join(w['attacks'])} |"
        for w in summary["worst_case"]
    ]
    lines += ["", "Diagnostics:", ""]
    lines += [f"- **{d['status']}** {d['name']}: {d['detail']}" for d in summary["diagnostics"]]
    lines += ["", "Attack hyper-parameters:", ""]
    params = {r["attack"]: r["params"] for r in summary["results"]}
    lines += [f"- {name}: `{json.dumps(p)}`" for name, p in params.items()]
    return "\n".join(lines) + "\n"


def plot_robust_accuracy(summary: Mapping[str, Any], path: Path) -> None:
    """Robust accuracy against eps, one line per attack and the worst case, one panel per norm."""
    norms = list(dict.fromkeys(r["norm"] for r in summary["results"]))
    fig, axes = plt.subplots(1, len(norms), figsize=(6 * len(norms), 4.5), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=True):
        rows = [r for r in summary["results"] if r["norm"] == norm]
        for attack in dict.fromkeys(r["attack"] for r in rows):
            points = sorted((r["eps"], r["robust_acc"]) for r in rows if r["attack"] == attack)
            ax.plot(*zip(*points, strict=True), marker="o", label=attack)
        worst = sorted(
            (w["eps"], w["robust_acc"]) for w in summary["worst_case"] if w["norm"] == norm
        )
        ax.plot(*zip(*worst, strict=True), "k--", marker="s", linewidth=2, label="worst case")
        ax.axhline(summary["clean_acc"], color="grey", linewidth=0.8, label="clean")
        ax.set(xlabel=f"eps ({norm})", ylabel="robust accuracy", ylim=(-0.02, 1.02))
        ax.set_title(f"{summary['model']} {summary['activation']} on {summary['data']}, {norm}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _image(x: torch.Tensor):
    return x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)


def plot_examples(evaluation: Evaluation, labels: torch.Tensor, path: Path) -> None:
    """Clean images, then each attack's adversarial images at its largest eps below 1.

    Titles are predictions, red when wrong."""
    chosen: dict[str, Any] = {}
    for r in evaluation.results:
        best = chosen.get(r.attack)
        if best is None or (r.eps < 1 and (best.eps >= 1 or r.eps > best.eps)):
            chosen[r.attack] = r
    rows = [("clean", evaluation.clean_examples, evaluation.clean_preds)]
    rows += [(f"{a} eps={r.eps:g}", r.examples, r.example_preds) for a, r in chosen.items()]
    n = len(evaluation.clean_examples)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
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
    plt.close(fig)


def write(
    summary: Mapping[str, Any], evaluation: Evaluation, labels: torch.Tensor, out: Path
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(markdown(summary))
    plot_robust_accuracy(summary, out / "robust_accuracy.png")
    plot_examples(evaluation, labels, out / "examples.png")


def print_console(summary: Mapping[str, Any], out: Path) -> None:
    """The results and the worst case as a rich table, the diagnostics, where the report is."""
    table = Table(title=f"clean accuracy {_pct(summary['clean_acc'])} on {summary['n_samples']}")
    for column in COLUMNS:
        table.add_column(
            column, justify="left" if column in ("attack", "kind", "norm") else "right"
        )
    for row in summary["results"]:
        table.add_row(*_row_cells(row))
    for w in summary["worst_case"]:
        table.add_row(
            "worst_case", "", w["norm"], _fmt(w["eps"]), _pct(w["robust_acc"]), style="bold"
        )
    console = Console()
    if not console.is_terminal:  # logs and pipes: the whole table, not 80 squeezed columns
        console = Console(width=160)
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
        config={
            k: v for k, v in summary.items() if k not in ("results", "worst_case", "diagnostics")
        }
        | {"train_run_id": train["wandb_id"]},
        dir=str(out),
        mode=mode,
    )
    try:
        rows = [[r[c] for c in COLUMNS] for r in summary["results"]]
        run.log(
            {
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
        for w in summary["worst_case"]:
            run.summary[f"worst_case/{w['norm']}/eps={w['eps']}"] = w["robust_acc"]
    finally:
        run.finish()
