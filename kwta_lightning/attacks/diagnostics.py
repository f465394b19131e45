"""Checks that tell real robustness from a masked gradient (Carlini et al. 2019, "On Evaluating
Adversarial Robustness"; Pintor et al. 2022, "Indicators of Attack Failure").

Each check is ``pass`` or ``warn`` with a one-line reason, scoped to a norm and eps where it is
about one (``None``: about the whole evaluation); a check that does not apply (say, no FGSM was
run) is left out. Two accuracies differ only when they differ by more than ``tolerance`` of the
inputs and by more than one input; the comparison is on counts of inputs, never on floats.

Some checks run attacks of their own (PGD at eps 1, PGD with more steps); their per-input outcomes
count towards the verdict's worst case like any other attack's.
"""

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from kwta_lightning.attacks.base import Attack, AttackResult, margin_loss
from kwta_lightning.attacks.evaluate import Evaluator
from kwta_lightning.attacks.pgd import PGD

WHITE_BOX = ("gradient",)
NOT_WHITE_BOX = ("adaptive", "black_box", "transfer")
DEEPFOOL = ("deepfool", "deepfool_l2")
AT_EPS = 0.99  # a DeepFool perturbation this close to eps counts as "at eps"
MAX_AT_EPS_SHARE = 0.5  # more than this share of DeepFool's successes at eps: a masking signature


@dataclass
class Diagnostic:
    name: str
    status: str  # "pass" or "warn"
    detail: str
    norm: str | None = None
    eps: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(
    name: str, ok: bool, passed: str, warned: str, norm: str | None = None, eps: float | None = None
) -> Diagnostic:
    return Diagnostic(name, "pass" if ok else "warn", passed if ok else warned, norm, eps)


class Counts:
    """Robust counts of results over ``n`` inputs, and when one count is really below another."""

    def __init__(self, n: int, tolerance: float) -> None:
        self.n, self.slack = n, max(tolerance * n, 1.0)

    def below(self, a: int, b: int) -> bool:
        """Whether count a is below count b by more than the tolerance and one input."""
        return b - a > self.slack


def _count(result: AttackResult) -> int:
    return int(result.robust.sum())


def _pct(count: int, n: int) -> str:
    return f"{count / n:.1%}"


def unbounded(result: AttackResult, num_classes: int, steps: int) -> Diagnostic:
    n, count = len(result.robust), _count(result)
    chance = 1 / num_classes
    return _check(
        "unbounded_eps",
        count <= chance * n,
        f"PGD at eps=1 ({steps} steps) leaves {_pct(count, n)} <= chance {chance:.1%}",
        f"PGD at eps=1 ({steps} steps) leaves {_pct(count, n)} > chance {chance:.1%}: "
        "the gradient does not lead anywhere (masking) or the attack is broken",
        norm="linf",
    )


def monotonic(results: Sequence[AttackResult], counts: Counts) -> list[Diagnostic]:
    out = []
    for attack in dict.fromkeys(r.attack for r in results):
        mine = sorted((r.eps, _count(r), r.norm) for r in results if r.attack == attack)
        if len(mine) < 2:
            continue
        rises = [
            (e0, e1)
            for (e0, c0, _), (e1, c1, _) in zip(mine, mine[1:], strict=False)
            if counts.below(c0, c1)
        ]
        warned = (
            f"{attack}'s robust accuracy rises from eps={rises[0][0]} to {rises[0][1]}"
            if rises
            else ""
        )
        out.append(
            _check(
                f"monotonic/{attack}",
                not rises,
                f"{attack}'s robust accuracy does not rise with eps",
                warned + ": the attack does not find what it found at a smaller eps",
                norm=mine[0][2],
                eps=rises[0][1] if rises else None,
            )
        )
    return out


def _find(results: Sequence[AttackResult], attack: str, eps: float) -> AttackResult | None:
    return next((r for r in results if r.attack == attack and r.eps == eps), None)


def iterative_beats_single_step(
    results: Sequence[AttackResult], counts: Counts
) -> list[Diagnostic]:
    out = []
    for pgd in (r for r in results if r.attack == "pgd"):
        fgsm = _find(results, "fgsm", pgd.eps)
        if fgsm is None:
            continue
        p, f = _count(pgd), _count(fgsm)
        out.append(
            _check(
                f"pgd_vs_fgsm/eps={pgd.eps:g}",
                not counts.below(f, p),
                f"PGD {_pct(p, counts.n)} <= FGSM {_pct(f, counts.n)}",
                f"PGD {_pct(p, counts.n)} > FGSM {_pct(f, counts.n)}: the iterative attack is "
                "weaker than one step (masked or noisy gradient)",
                pgd.norm,
                pgd.eps,
            )
        )
    return out


def white_box_beats_the_rest(results: Sequence[AttackResult], counts: Counts) -> list[Diagnostic]:
    """Attacks that know less of the model than its gradient (adaptive: estimated or surrogate
    gradients; black-box; transfer) must not beat the best white-box gradient attack."""
    out = []
    for norm, eps in sorted({(r.norm, r.eps) for r in results}):
        here = [r for r in results if r.norm == norm and r.eps == eps]
        white = [r for r in here if r.kind in WHITE_BOX]
        other = [r for r in here if r.kind in NOT_WHITE_BOX]
        if not white or not other:
            continue
        best_white, best_other = min(white, key=_count), min(other, key=_count)
        w, b = _count(best_white), _count(best_other)
        out.append(
            _check(
                f"white_box_vs_adaptive/{norm}/eps={eps:g}",
                not counts.below(b, w),
                f"best white-box {best_white.attack} {_pct(w, counts.n)} <= best adaptive, "
                f"black-box or transfer {best_other.attack} {_pct(b, counts.n)}",
                f"{best_other.attack} ({best_other.kind}) {_pct(b, counts.n)} beats the best "
                f"white-box attack {best_white.attack} {_pct(w, counts.n)}: gradient masking",
                norm,
                eps,
            )
        )
    return out


def deepfool_at_eps(
    results: Sequence[AttackResult], clean_correct: torch.Tensor
) -> list[Diagnostic]:
    """DeepFool steps to the nearest linearised boundary: on a smooth model its successes lie
    inside the ball; when most sit on its edge, the linear model was wrong and only clipping to
    eps (a large, blind step) fooled the model, a masking signature."""
    out = []
    for r in (r for r in results if r.attack in DEEPFOOL and r.eps > 0):
        fooled = clean_correct & ~r.robust
        if not fooled.any():
            continue
        share = (r.norms[fooled] >= AT_EPS * r.eps).float().mean().item()
        median = r.norms[fooled].median().item()
        out.append(
            _check(
                f"deepfool_at_eps/{r.attack}/eps={r.eps:g}",
                share <= MAX_AT_EPS_SHARE,
                f"{share:.0%} of {r.attack}'s successes lie at eps (median {median:.3g})",
                f"{share:.0%} of {r.attack}'s successes lie at eps (median {median:.3g}): "
                "its linear steps overshoot, the gradient does not describe the model",
                r.norm,
                r.eps,
            )
        )
    return out


def input_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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


def result_checks(
    results: Sequence[AttackResult], clean_correct: torch.Tensor, tolerance: float
) -> list[Diagnostic]:
    """The checks that read the attacks' outcomes alone (no model needed: merged reports)."""
    counts = Counts(len(clean_correct), tolerance)
    return [
        *monotonic(results, counts),
        *iterative_beats_single_step(results, counts),
        *white_box_beats_the_rest(results, counts),
        *deepfool_at_eps(results, clean_correct),
    ]


RunAttack = Callable[[Attack, list[float]], list[AttackResult]]


def pgd_convergence(
    pgd: PGD,
    eps: Sequence[float],
    first: Sequence[AttackResult],
    run: RunAttack,
    counts: Counts,
    doublings: int,
) -> tuple[list[Diagnostic], list[AttackResult]]:
    """Double PGD's steps until the worst case over all runs so far stops falling.

    Per eps: flat when a doubled run fools at most the tolerance of inputs that every shorter run
    missed. A run that is still falling after ``doublings`` is reported as never flat: more steps
    keep finding adversarial inputs, as they do when the gradient is masked.
    """
    diagnostics, extra = [], []
    survivors = {r.eps: r.robust.clone() for r in first}
    history = {r.eps: [(pgd.steps, _count(r))] for r in first}
    todo = list(eps)
    for k in range(1, doublings + 1):
        if not todo:
            break
        longer = copy.copy(pgd)
        longer.steps, longer.name = pgd.steps * 2**k, f"pgd_steps{pgd.steps * 2**k}"
        results = run(longer, todo)
        extra += results
        still = []
        for r in results:
            before = int(survivors[r.eps].sum())
            survivors[r.eps] &= r.robust
            history[r.eps].append((longer.steps, int(survivors[r.eps].sum())))
            if counts.below(int(survivors[r.eps].sum()), before):
                still.append(r.eps)
        todo = still
    for e in eps:
        trail = ", ".join(f"{s} steps {_pct(c, counts.n)}" for s, c in history[e])
        diagnostics.append(
            _check(
                f"pgd_convergence/eps={e:g}",
                e not in todo,
                f"flat: {trail} (worst case over the runs so far)",
                f"still falling after {doublings} doublings: {trail}; the optimisation is "
                "incomplete or the gradient is masked",
                "linf",
                e,
            )
        )
    return diagnostics, extra


def library_checks(warnings: Sequence[str]) -> list[Diagnostic]:
    """The reference AutoAttack's own checks (randomness, logits range, zero gradients, Square
    beating APGD, ...), which it only logs."""
    return [Diagnostic("autoattack_checks", "warn", " ".join(w.split())) for w in warnings]


def verdict(
    results: Sequence[AttackResult],
    clean_correct: torch.Tensor,
    diagnostics: Sequence[Diagnostic],
) -> list[dict[str, Any]]:
    """Per norm and eps: the worst case over every attack run there (the diagnostics' own runs
    included), and whether gradient masking is suspected, with the warnings that say so."""
    groups: dict[tuple[str, float], list[AttackResult]] = {}
    for r in results:
        groups.setdefault((r.norm, r.eps), []).append(r)
    rows = []
    for (norm, eps), here in sorted(groups.items()):
        robust = clean_correct.clone()
        for r in here:
            robust &= r.robust
        reasons = [
            f"{d.name}: {d.detail}"
            for d in diagnostics
            if d.status == "warn" and d.norm in (None, norm) and d.eps in (None, eps)
        ]
        strongest = min(here, key=_count)
        rows.append(
            {
                "norm": norm,
                "eps": eps,
                "robust_acc": int(robust.sum()) / len(robust),
                "n_robust": int(robust.sum()),
                "n": len(robust),
                "strongest_attack": strongest.attack,
                "masking_suspected": bool(reasons),
                "reasons": reasons,
                "attacks": list(dict.fromkeys(r.attack for r in here)),
            }
        )
    return rows


def planned_runs(attacks: Mapping[str, Attack], pgd_radii: int, convergence_doublings: int) -> int:
    """How many attack runs (one per eps) the diagnostics make at most: the unbounded probe,
    and PGD's doublings at every radius PGD runs at (fewer when PGD flattens early)."""
    converging = isinstance(attacks.get("pgd"), PGD)
    return 1 + (pgd_radii * convergence_doublings if converging else 0)


def planned_passes(
    attacks: Mapping[str, Attack], pgd_radii: int, unbounded_steps: int, convergence_doublings: int
) -> float:
    """Forward-backward passes per input of those runs at most (see ``Attack.passes``)."""
    pgd = attacks.get("pgd")
    if not isinstance(pgd, PGD):
        return unbounded_steps
    doubled = sum(2**k for k in range(1, convergence_doublings + 1))
    return unbounded_steps + pgd.passes() * doubled * pgd_radii


def run_diagnostics(
    evaluator: Evaluator,
    attacks: Mapping[str, Attack],
    params: Mapping[str, Mapping[str, Any]],
    num_classes: int,
    tolerance: float,
    unbounded_steps: int,
    convergence_doublings: int,
    vanishing_threshold: float,
    max_vanishing_share: float,
) -> tuple[list[Diagnostic], list[AttackResult], dict[str, dict[str, Any]]]:
    """Every diagnostic that applies to the attacks run, and the results and parameters of the
    attacks the diagnostics ran at the evaluated radii (they count towards the worst case)."""
    results = evaluator.evaluation.results
    correct = evaluator.evaluation.clean_correct
    counts = Counts(len(correct), tolerance)
    pgd = attacks.get("pgd")
    first = [r for r in results if r.attack == "pgd"]
    converging = isinstance(pgd, PGD) and first and convergence_doublings > 0
    probe = PGD(steps=unbounded_steps, random_start=False, name="pgd_unbounded")
    (far,) = evaluator.run(probe, [1.0], {"steps": unbounded_steps})
    diagnostics = [unbounded(far, num_classes, unbounded_steps)]
    diagnostics += result_checks(results, correct, tolerance)
    x, y, size = evaluator.x, evaluator.y, evaluator.batch_size
    norms = torch.cat(
        [
            input_gradient_norms(
                evaluator.model,
                x[i : i + size].to(evaluator.device),
                y[i : i + size].to(evaluator.device),
            ).cpu()
            for i in range(0, len(x), size)
        ]
    )
    diagnostics.append(vanishing_gradients(norms, vanishing_threshold, max_vanishing_share))
    extra: list[AttackResult] = []
    extra_params: dict[str, dict[str, Any]] = {}
    if converging:
        found, extra = pgd_convergence(
            pgd,
            [r.eps for r in first],
            first,
            lambda a, e: evaluator.run(a, e, {**params.get("pgd", {}), "steps": a.steps}),
            counts,
            convergence_doublings,
        )
        diagnostics += found
        extra_params = {
            r.attack: {**params.get("pgd", {}), "steps": int(r.attack[9:])} for r in extra
        }
    warnings = [w for a in attacks.values() for w in getattr(a, "warnings", [])]
    diagnostics += library_checks(warnings)
    return diagnostics, extra, extra_params
