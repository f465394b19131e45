"""Checks that tell real robustness from a masked gradient (Carlini et al. 2019, "On Evaluating
Adversarial Robustness"; Pintor et al. 2022, "Indicators of Attack Failure").

Each check is ``pass`` or ``warn`` with a one-line reason; a check that does not apply (say, no
FGSM was run) is left out. Differences smaller than ``tolerance`` (and than one input) pass.
"""

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import foolbox as fb
import torch
from torch import nn

from kwta_lightning.attacks.base import Attack, margin_loss
from kwta_lightning.attacks.evaluate import Evaluation, run_attack
from kwta_lightning.attacks.library import FoolboxAttack

WHITE_BOX = ("gradient",)
WEAKER_KNOWLEDGE = ("black_box", "transfer")


@dataclass
class Diagnostic:
    name: str
    status: str  # "pass" or "warn"
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, ok: bool, passed: str, warned: str) -> Diagnostic:
    return Diagnostic(name, "pass" if ok else "warn", passed if ok else warned)


def unbounded(accuracy: float, num_classes: int, steps: int) -> Diagnostic:
    chance = 1 / num_classes
    return _check(
        "unbounded_eps",
        accuracy <= chance,
        f"PGD at eps=1 ({steps} steps, clean start) leaves {accuracy:.1%} <= chance {chance:.1%}",
        f"PGD at eps=1 ({steps} steps, clean start) leaves {accuracy:.1%} > chance {chance:.1%}: "
        "the gradient does not lead anywhere (masking) or the attack is broken",
    )


def monotonic(rows: Sequence[dict[str, Any]], tolerance: float) -> list[Diagnostic]:
    out = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        accs = sorted((r["eps"], r["robust_acc"]) for r in rows if r["attack"] == attack)
        if len(accs) < 2:
            continue
        rises = [
            (e0, e1)
            for (e0, a0), (e1, a1) in zip(accs, accs[1:], strict=False)
            if a1 > a0 + tolerance
        ]
        warned = f"robust accuracy rises from eps={rises[0][0]} to {rises[0][1]}" if rises else ""
        passed = "robust accuracy does not rise with eps"
        out.append(_check(f"monotonic/{attack}", not rises, passed, warned))
    return out


def _acc(rows: Sequence[dict[str, Any]], attack: str, eps: float) -> float | None:
    return next((r["robust_acc"] for r in rows if r["attack"] == attack and r["eps"] == eps), None)


def iterative_beats_single_step(
    rows: Sequence[dict[str, Any]], tolerance: float
) -> list[Diagnostic]:
    out = []
    for eps in sorted({r["eps"] for r in rows if r["attack"] == "pgd"}):
        pgd, fgsm = _acc(rows, "pgd", eps), _acc(rows, "fgsm", eps)
        if fgsm is None:
            continue
        out.append(
            _check(
                f"pgd_vs_fgsm/eps={eps}",
                pgd <= fgsm + tolerance,
                f"PGD {pgd:.1%} <= FGSM {fgsm:.1%}",
                f"PGD {pgd:.1%} > FGSM {fgsm:.1%}: the iterative attack is weaker than one "
                "step (masked or noisy gradient)",
            )
        )
    return out


def white_box_beats_black_box(rows: Sequence[dict[str, Any]], tolerance: float) -> list[Diagnostic]:
    out = []
    for norm, eps in sorted({(r["norm"], r["eps"]) for r in rows}):
        here = [r for r in rows if r["norm"] == norm and r["eps"] == eps]
        white = [r for r in here if r["kind"] in WHITE_BOX]
        weaker = [r for r in here if r["kind"] in WEAKER_KNOWLEDGE]
        if not white or not weaker:
            continue
        best_white = min(white, key=lambda r: r["robust_acc"])
        best_weaker = min(weaker, key=lambda r: r["robust_acc"])
        w, b = best_white["robust_acc"], best_weaker["robust_acc"]
        out.append(
            _check(
                f"white_box_vs_black_box/{norm}/eps={eps}",
                b >= w - tolerance,
                f"best white-box {best_white['attack']} {w:.1%} <= "
                f"best black-box/transfer {best_weaker['attack']} {b:.1%}",
                f"{best_weaker['attack']} ({best_weaker['kind']}) {b:.1%} beats the best "
                f"white-box attack {best_white['attack']} {w:.1%}: gradient masking suspected",
            )
        )
    return out


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of the margin loss's input gradient (margin: CE saturates when sure)."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(margin_loss(model(x), y).sum(), x)
    return grad.flatten(1).norm(dim=1)


def vanishing_gradients(norms: torch.Tensor, threshold: float, max_share: float) -> Diagnostic:
    share = (norms <= threshold).float().mean().item()
    return _check(
        "vanishing_gradient",
        share <= max_share,
        f"{share:.1%} of inputs have an input gradient norm <= {threshold:g}",
        f"{share:.1%} of inputs have an input gradient norm <= {threshold:g} (> {max_share:.0%}): "
        "gradient attacks cannot move them",
    )


def more_steps(
    rows: Sequence[dict[str, Any]], doubled: dict[float, float], steps: int, tolerance: float
) -> list[Diagnostic]:
    out = []
    for eps, acc2 in sorted(doubled.items()):
        acc = _acc(rows, "pgd", eps)
        out.append(
            _check(
                f"pgd_2x_steps/eps={eps}",
                acc2 >= acc - tolerance,
                f"PGD {2 * steps} steps {acc2:.1%} vs {steps} steps {acc:.1%}",
                f"PGD {2 * steps} steps {acc2:.1%} < {steps} steps {acc:.1%}: the optimisation "
                "had not converged; use more steps",
            )
        )
    return out


def run_diagnostics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    evaluation: Evaluation,
    rows: Sequence[dict[str, Any]],
    attacks: dict[str, Attack],
    num_classes: int,
    batch_size: int,
    device: torch.device,
    tolerance: float,
    unbounded_steps: int,
    vanishing_threshold: float,
    max_vanishing_share: float,
) -> list[Diagnostic]:
    """Every diagnostic that applies to the attacks run; some run extra attacks."""
    tolerance = max(tolerance, 1 / len(x) + 1e-9)
    correct = evaluation.clean_correct

    def accuracy(attack: Attack, eps: list[float]) -> list[float]:
        results = run_attack(model, attack, x, y, eps, correct, batch_size, device, 0)
        return [r.robust.float().mean().item() for r in results]

    probe = fb.attacks.LinfPGD(steps=unbounded_steps, random_start=False)
    (unbounded_acc,) = accuracy(FoolboxAttack(probe, name="pgd_unbounded"), [1.0])
    diagnostics = [unbounded(unbounded_acc, num_classes, unbounded_steps)]
    diagnostics += monotonic(rows, tolerance)
    diagnostics += iterative_beats_single_step(rows, tolerance)
    diagnostics += white_box_beats_black_box(rows, tolerance)
    norms = torch.cat(
        [
            input_gradients(
                model, x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            )
            for i in range(0, len(x), batch_size)
        ]
    )
    diagnostics.append(vanishing_gradients(norms.cpu(), vanishing_threshold, max_vanishing_share))
    pgd = attacks.get("pgd")
    if isinstance(pgd, FoolboxAttack) and hasattr(pgd.fb_attack, "steps"):
        longer = copy.copy(pgd.fb_attack)
        longer.steps = 2 * pgd.fb_attack.steps
        eps = sorted({r["eps"] for r in rows if r["attack"] == "pgd"})
        doubled = dict(zip(eps, accuracy(FoolboxAttack(longer, name="pgd_2x"), eps), strict=True))
        diagnostics += more_steps(rows, doubled, pgd.fb_attack.steps, tolerance)
    return diagnostics
