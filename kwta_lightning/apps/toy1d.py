"""The k-WTA paper's 1-D picture: a k-WTA network fitted to a few points is discontinuous.

    uv run kwta-toy1d act=kwta gamma=0.2
    uv run kwta-toy1d act=relu

A small MLP (1 -> width -> width -> 1) is fitted to a few samples of a smooth function. A ReLU
network is continuous; a k-WTA network jumps wherever the set of winners changes, because the unit
that enters the top k and the one that leaves it feed the next layer through different weights.
Jumps are found on a fine grid and confirmed by bisection: a change that does not shrink as the
interval does is a discontinuity, not a steep slope.
"""

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import nn

from kwta_lightning.core.activations import make_activation
from kwta_lightning.run.console import print_summary
from kwta_lightning.run.loggers import log_images_to_wandb

log = logging.getLogger(__name__)


def target(x: torch.Tensor) -> torch.Tensor:
    """The function to fit: smooth, a few wiggles over [-1, 1]."""
    return torch.sin(3 * math.pi * x) * 0.8 + 0.3 * x


def make_mlp(act: str, gamma: float, width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, width),
        make_activation(act, gamma),
        nn.Linear(width, width),
        make_activation(act, gamma),
        nn.Linear(width, 1),
    ).double()


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> float:
    """Full-batch Adam on the mean squared error; returns the final training loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.no_grad()
def find_jumps(
    f: Callable[[torch.Tensor], torch.Tensor],
    grid: torch.Tensor,
    bisections: int = 30,
    rel_tol: float = 1e-4,
) -> torch.Tensor:
    """Locations of the discontinuities of f between neighbouring grid points.

    Every interval is bisected ``bisections`` times, keeping the half with the larger change; if
    the change is still above ``rel_tol`` times the range of f at width ~ dx * 2**-bisections, f
    jumps there (a continuous f would have shrunk the change by the same factor).
    """
    values = f(grid[:, None])[:, 0]
    tol = rel_tol * float(values.max() - values.min())
    lo, hi = grid[:-1].clone(), grid[1:].clone()
    f_lo, f_hi = values[:-1].clone(), values[1:].clone()
    for _ in range(bisections):
        mid = (lo + hi) / 2
        f_mid = f(mid[:, None])[:, 0]
        left = (f_mid - f_lo).abs() >= (f_hi - f_mid).abs()
        hi, f_hi = torch.where(left, mid, hi), torch.where(left, f_mid, f_hi)
        lo, f_lo = torch.where(left, lo, mid), torch.where(left, f_lo, f_mid)
    return ((lo + hi) / 2)[(f_hi - f_lo).abs() > tol]


def plot(
    grid: torch.Tensor,
    fitted: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    jumps: torch.Tensor,
    title: str,
    path: Path,
) -> None:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.plot(grid, target(grid), color="tab:green", lw=1, label="target")
    ax.plot(grid, fitted, color="tab:blue", lw=1, label="fitted network")
    ax.scatter(x[:, 0], y[:, 0], color="tab:red", s=18, zorder=3, label="training points")
    for location in jumps.tolist():
        ax.axvline(location, color="grey", lw=0.3, alpha=0.5)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(cfg: DictConfig) -> dict:
    x = torch.linspace(-1, 1, cfg.n_points, dtype=torch.float64)[:, None]
    y = target(x)
    model = make_mlp(cfg.act.name, cfg.gamma, cfg.width, cfg.seed)
    train_loss = fit(model, x, y, cfg.steps, cfg.lr)
    grid = torch.linspace(-1, 1, cfg.grid_points, dtype=torch.float64)
    jumps = find_jumps(model, grid)
    act = cfg.act.name
    label = act if act == "relu" else f"{act} gamma={cfg.gamma}"
    out = Path(cfg.paths.output_dir)
    with torch.no_grad():
        fitted = model(grid[:, None])[:, 0]
    title = f"{label}: {len(jumps)} jumps on {cfg.grid_points} grid points"
    plot(grid, fitted, x, y, jumps, title, out / "toy1d.png")
    result = {
        "act": act,
        "gamma": None if act == "relu" else cfg.gamma,
        "jumps": len(jumps),
        "grid_points": cfg.grid_points,
        "train_mse": train_loss,
    }
    (out / "toy1d.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = {"jumps": len(jumps), "train_mse": train_loss}
    images = {"toy1d": out / "toy1d.png"}
    log_images_to_wandb(cfg.wandb.mode, cfg.wandb.project, "toy1d", str(out), images, summary)
    print_summary(f"1-D fit, {label}", result | {"output_dir": str(out)})
    return result
