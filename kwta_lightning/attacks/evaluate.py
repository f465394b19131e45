"""Run attacks batch by batch and turn their outputs into the report's numbers.

Robust accuracy counts an input as robust when it is classified correctly both clean and after the
attack (already-misclassified inputs are never robust). The success rate is taken over the inputs
classified correctly when clean. The worst case at an eps keeps an input robust only when it
survives every attack of that norm at that eps. Throughput at an eps is the inputs attacked there
(all of them, correct when clean or not) per second of that eps's wall time.
"""

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from kwta_lightning.attacks.base import Attack, perturbation_norms, project

log = logging.getLogger(__name__)

BOUND_TOLERANCE = 1e-4  # float noise allowed beyond eps or [0, 1] before an output is a bug


class AttackBoundsError(RuntimeError):
    """An attack returned inputs outside its eps ball or outside [0, 1] (a bug, not bad input)."""


@dataclass
class AttackResult:
    """One attack at one eps: per-sample outcomes, and the first inputs for the examples plot."""

    attack: str
    norm: str
    kind: str
    eps: float
    robust: torch.Tensor
    norms: torch.Tensor
    extra: dict[str, torch.Tensor]
    wall_time_s: float
    examples: torch.Tensor
    example_preds: torch.Tensor


@dataclass
class Evaluation:
    clean_correct: torch.Tensor
    clean_preds: torch.Tensor
    clean_examples: torch.Tensor
    results: list[AttackResult] = field(default_factory=list)


def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    preds = [torch.zeros(0, dtype=torch.long)]
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            preds.append(model(x[i : i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(preds)


def checked(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, name: str) -> torch.Tensor:
    """x_adv with float noise projected away; AttackBoundsError when it is more than noise."""
    excess = (perturbation_norms(x_adv, x, norm) - eps).max().item()
    outside = max(-x_adv.min().item(), x_adv.max().item() - 1.0)
    if excess > BOUND_TOLERANCE or outside > BOUND_TOLERANCE:
        raise AttackBoundsError(
            f"attack {name} at eps={eps} left its {norm} ball by {excess:.3g} "
            f"or [0, 1] by {outside:.3g}"
        )
    return project(x_adv, x, eps, norm)


def eps_groups(attack: Attack, n_eps: int) -> list[list[int]]:
    """The eps indices of each call: all in one when the attack shares a run, else one by one."""
    if attack.shares_epsilons:
        return [list(range(n_eps))]
    return [[i] for i in range(n_eps)]


def run_attack(
    model: nn.Module,
    attack: Attack,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilons: Sequence[float],
    clean_correct: torch.Tensor,
    batch_size: int,
    device: torch.device,
    n_examples: int,
    progress: Progress | None = None,
) -> list[AttackResult]:
    """The attack over all inputs at every eps, batch by batch.

    An eps's wall time sums its calls of the attack and the bounds check (not the robust accuracy
    check); an attack that shares one run across epsilons gives every eps that run's time.
    """
    task = progress.add_task(attack.name, total=len(x)) if progress else None
    robust = [[] for _ in epsilons]
    norms = [[] for _ in epsilons]
    extras: list[dict[str, list[torch.Tensor]]] = [{} for _ in epsilons]
    adv_first: list[torch.Tensor] = [x[:0] for _ in epsilons]
    wall = [0.0 for _ in epsilons]
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        for group in eps_groups(attack, len(epsilons)):
            started = time.perf_counter()
            outputs = attack.run(model, xb, yb, [epsilons[i] for i in group])
            # checked() reads the results back, so queued CUDA work is done when the clock stops
            x_advs = [
                checked(out.x_adv, xb, epsilons[i], attack.norm, attack.name)
                for i, out in zip(group, outputs, strict=True)
            ]
            elapsed = time.perf_counter() - started
            for i, out, x_adv in zip(group, outputs, x_advs, strict=True):
                wall[i] += elapsed
                with torch.no_grad():
                    correct = (model(x_adv).argmax(1) == yb).cpu()
                robust[i].append(correct & clean_correct[start : start + len(yb)])
                norms[i].append(perturbation_norms(x_adv, xb, attack.norm).cpu())
                for key, value in out.extra.items():
                    extras[i].setdefault(key, []).append(value.detach().float().cpu())
                if len(adv_first[i]) < n_examples:
                    adv_first[i] = torch.cat([adv_first[i], x_adv[:n_examples].cpu()])[:n_examples]
        if progress:
            progress.advance(task, len(yb))
    return [
        AttackResult(
            attack=attack.name,
            norm=attack.norm,
            kind=attack.kind,
            eps=float(eps),
            robust=torch.cat(robust[i]),
            norms=torch.cat(norms[i]),
            extra={k: torch.cat(v) for k, v in extras[i].items()},
            wall_time_s=wall[i],
            examples=adv_first[i],
            example_preds=predict(model, adv_first[i], batch_size, device),
        )
        for i, eps in enumerate(epsilons)
    ]


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Mapping[str, Attack],
    epsilons: Mapping[str, Sequence[float]],
    batch_size: int,
    device: torch.device,
    n_examples: int = 8,
) -> Evaluation:
    """Clean predictions, then every attack at every eps of its norm."""
    model = model.to(device).eval()
    clean_preds = predict(model, x, batch_size, device)
    evaluation = Evaluation(clean_preds == y, clean_preds, x[:n_examples])
    with progress_bar() as progress:
        for attack in attacks.values():
            results = run_attack(
                model,
                attack,
                x,
                y,
                epsilons[attack.norm],
                evaluation.clean_correct,
                batch_size,
                device,
                n_examples,
                progress,
            )
            accuracies = ", ".join(
                f"eps={r.eps:g}: {r.robust.float().mean():.1%} ({r.wall_time_s:.0f} s)"
                for r in results
            )
            log.info("%s robust accuracy %s", attack.name, accuracies)
            evaluation.results += results
    return evaluation


def success_rate(robust: torch.Tensor, clean_correct: torch.Tensor) -> float | None:
    n = int(clean_correct.sum())
    return None if n == 0 else 1.0 - int(robust.sum()) / n


def result_rows(evaluation: Evaluation, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's ``results``: one row per attack and eps."""
    rows = []
    correct = evaluation.clean_correct
    for r in evaluation.results:
        fooled = correct & ~r.robust
        row = {
            "attack": r.attack,
            "kind": r.kind,
            "norm": r.norm,
            "eps": r.eps,
            "robust_acc": r.robust.float().mean().item(),
            "success_rate": success_rate(r.robust, correct),
            "median_norm": r.norms[fooled].median().item() if fooled.any() else None,
            "wall_time_s": round(r.wall_time_s, 2),
            "images_per_s": float(f"{len(r.robust) / r.wall_time_s:.4g}"),
            "params": params.get(r.attack, {}),
        }
        for key, value in r.extra.items():
            row[key] = value[correct].mean().item() if correct.any() else None
        rows.append(row)
    return rows


def worst_case(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Per norm and eps: the share of inputs that survive every attack run there."""
    groups: dict[tuple[str, float], list[AttackResult]] = {}
    for r in evaluation.results:
        groups.setdefault((r.norm, r.eps), []).append(r)
    rows = []
    for (norm, eps), results in sorted(groups.items()):
        robust = evaluation.clean_correct.clone()
        for r in results:
            robust &= r.robust
        rows.append(
            {
                "norm": norm,
                "eps": eps,
                "robust_acc": robust.float().mean().item(),
                "attacks": [r.attack for r in results],
            }
        )
    return rows
