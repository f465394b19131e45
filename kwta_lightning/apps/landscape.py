"""Loss landscapes and activation-pattern changes around test inputs, for one or more checkpoints.

    uv run kwta-landscape 'ckpts=[A.ckpt,B.ckpt]' n_inputs=4

For each test input x the loss is evaluated at x + a*g + b*r on a grid of (a, b) in [-eps, eps]^2,
where g = sign(grad_x loss) (the direction a gradient attack takes) and r is a random sign
direction, as in the k-WTA paper's figure. k-WTA surfaces are rugged and ReLU surfaces smooth;
``roughness`` (mean absolute second difference over the grid) puts a number on it. Along the path
x + t*path_eps*g, ``activation_changes`` counts per layer how many units switch between kept and
zeroed: every switch is a jump a gradient cannot see coming.
"""

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import nn

from kwta_lightning.attacks.base import margin_loss
from kwta_lightning.attacks.checkpoint import (
    build_data,
    build_model,
    choose_samples,
    load_checkpoint,
)
from kwta_lightning.core.activations import kwta_layers
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.console import print_summary
from kwta_lightning.run.loggers import log_images_to_wandb

log = logging.getLogger(__name__)

LOSSES = {
    "ce": lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
    "margin": margin_loss,  # best other logit minus the true one: higher = worse
}


def _loss_fn(name: str):
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]


def directions(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, loss: str = "ce"
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = sign of the input gradient of the loss, r = a seeded random sign direction."""
    x = x.clone().requires_grad_()
    _loss_fn(loss)(model(x), y).sum().backward()
    g = x.grad.sign()
    generator = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1
    return g, r


@torch.no_grad()
def loss_grid(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Tensor,
    r: torch.Tensor,
    eps: float,
    steps: int,
    loss: str = "ce",
    batch_size: int = 512,
) -> torch.Tensor:
    """Loss at clamp(x + a*g + b*r, 0, 1) for a (rows) and b (columns) in linspace(-eps, eps).

    x, y, g, r describe one input (batch dimension 1). ``steps`` is odd so the centre is x itself.
    """
    if steps < 3 or steps % 2 == 0:
        raise ConfigError(f"grid steps must be odd and >= 3 (the centre is the input), got {steps}")
    offsets = torch.linspace(-eps, eps, steps, dtype=x.dtype, device=x.device)
    a, b = torch.meshgrid(offsets, offsets, indexing="ij")
    shape = (-1,) + (1,) * (x.dim() - 1)
    points = (x + a.reshape(shape) * g + b.reshape(shape) * r).clamp(0, 1)
    losses = [
        _loss_fn(loss)(model(chunk), y.expand(len(chunk))) for chunk in points.split(batch_size)
    ]
    return torch.cat(losses).view(steps, steps)


def roughness(grid: torch.Tensor) -> float:
    """Mean absolute second difference along both axes: 0 for a plane, large when rugged."""
    rows = (grid[2:, :] - 2 * grid[1:-1, :] + grid[:-2, :]).abs().mean()
    cols = (grid[:, 2:] - 2 * grid[:, 1:-1] + grid[:, :-2]).abs().mean()
    return float((rows + cols) / 2)


@torch.no_grad()
def activation_changes(
    model: nn.Module, x: torch.Tensor, g: torch.Tensor, eps: float, steps: int
) -> dict[str, list[int]]:
    """Per activation layer, how many units differ in state (zero or not) from x along x + t*eps*g.

    Works for k-WTA and ReLU layers alike (a layer's state is which outputs are nonzero).
    """
    layers = kwta_layers(model) or {
        name: m for name, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))
    }
    states: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out, name=name: states[name].append((out != 0).flatten(1))
        )
        for name, layer in layers.items()
    ]
    ts = torch.linspace(0, 1, steps, dtype=x.dtype, device=x.device)
    try:
        model((x + ts.view(-1, *([1] * (x.dim() - 1))) * eps * g).clamp(0, 1))
    finally:
        for hook in hooks:
            hook.remove()
    changes = {}
    for name, calls in states.items():
        pattern = torch.cat(calls, dim=1)  # a shared module's calls side by side
        changes[name] = (pattern != pattern[:1]).sum(dim=1).tolist()
    return changes


def describe(hparams: dict[str, Any]) -> str:
    act = hparams["activation"]
    gamma = f" gamma={hparams['gamma']}" if act != "relu" else ""
    return f"{hparams['backbone']} {act}{gamma}"


def plot_surfaces(grids: list[list[torch.Tensor]], titles: list[str], eps: float, path: Path):
    """One row per input, one column per model: the loss surface as a heat map."""
    n_inputs, n_models = len(grids[0]), len(grids)
    fig = Figure(figsize=(3.2 * n_models, 2.8 * n_inputs))
    axes = fig.subplots(n_inputs, n_models, squeeze=False)
    for col, (model_grids, title) in enumerate(zip(grids, titles, strict=True)):
        for row, grid in enumerate(model_grids):
            ax = axes[row][col]
            image = ax.imshow(
                grid.numpy(), origin="lower", extent=(-eps, eps, -eps, eps), cmap="viridis"
            )
            fig.colorbar(image, ax=ax, fraction=0.046)
            ax.set_title(f"{title}\nroughness {roughness(grid):.3g}", fontsize=8)
            ax.set_xlabel("random direction", fontsize=7)
            ax.set_ylabel("gradient-sign direction", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_changes(changes: list[dict[str, list[int]]], titles: list[str], eps: float, path: Path):
    """Units that changed state along the gradient-sign path, one panel per model."""
    fig = Figure(figsize=(4 * len(changes), 3))
    axes = fig.subplots(1, len(changes), squeeze=False)
    for ax, model_changes, title in zip(axes[0], changes, titles, strict=True):
        for name, counts in model_changes.items():
            ts = torch.linspace(0, eps, len(counts))
            ax.plot(ts.numpy(), counts, label=name or "act")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step along gradient sign (Linf)")
        ax.set_ylabel("units that changed state")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Landscapes and activation changes for every checkpoint in ``cfg.ckpts``."""
    if not cfg.ckpts:
        raise ConfigError("ckpts is empty: give one or more checkpoints, ckpts=[A.ckpt,B.ckpt]")
    out = Path(cfg.paths.output_dir)
    all_grids, all_changes, titles, results = [], [], [], []
    for path in cfg.ckpts:
        ckpt = load_checkpoint(path)
        model = build_model(ckpt)
        for p in model.parameters():
            p.requires_grad_(False)
        xs, ys, _ = choose_samples(build_data(ckpt, cfg.paths.data_dir), cfg.n_inputs, cfg.seed)
        grids, per_input = [], []
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            x, y = x[None], y[None]
            g, r = directions(model, x, y, seed=cfg.seed + i, loss=cfg.loss)
            grid = loss_grid(model, x, y, g, r, cfg.eps, cfg.steps, cfg.loss)
            grids.append(grid)
            changes = activation_changes(model, x, g, cfg.path_eps, cfg.path_steps)
            per_input.append({"roughness": roughness(grid), "changes_at_eps": changes})
        title = describe(ckpt["hyper_parameters"])
        titles.append(title)
        all_grids.append(grids)
        all_changes.append(per_input[0]["changes_at_eps"])  # the plot follows the first input
        mean_roughness = sum(p["roughness"] for p in per_input) / len(per_input)
        results.append(
            {
                "checkpoint": str(path),
                "model": title,
                "roughness_mean": mean_roughness,
                "roughness": [p["roughness"] for p in per_input],
                "changed_units_at_path_eps": [
                    {name: counts[-1] for name, counts in p["changes_at_eps"].items()}
                    for p in per_input
                ],
            }
        )
    plot_surfaces(all_grids, titles, cfg.eps, out / "landscape.png")
    plot_changes(all_changes, titles, cfg.path_eps, out / "activation_changes.png")
    report = {
        "eps": cfg.eps,
        "steps": cfg.steps,
        "loss": cfg.loss,
        "path_eps": cfg.path_eps,
        "models": results,
    }
    (out / "landscape.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = {f"roughness/{r['model']}": r["roughness_mean"] for r in results}
    images = {"landscape": out / "landscape.png", "changes": out / "activation_changes.png"}
    log_images_to_wandb(cfg.wandb.mode, cfg.wandb.project, "landscape", str(out), images, summary)
    print_summary("loss-surface roughness (mean over inputs)", summary | {"output_dir": str(out)})
    return report
