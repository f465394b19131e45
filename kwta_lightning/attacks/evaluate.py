"""Run attacks batch by batch and turn their outputs into the report's numbers.

Robust accuracy counts an input as robust when it is classified correctly both clean and after the
attack (already-misclassified inputs are never robust). The success rate is taken over the inputs
classified correctly when clean. The worst case at an eps keeps an input robust only when it
survives every attack of that norm at that eps. Throughput at an eps is the inputs attacked there
(all of them, correct when clean or not) per second of that eps's wall time.
"""

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kwta_lightning.attacks.base import Attack, AttackResult, perturbation_norms, project
from kwta_lightning.run.console import duration

log = logging.getLogger(__name__)

BOUND_TOLERANCE = 1e-4  # float noise allowed beyond eps or [0, 1] before an output is a bug


class AttackBoundsError(RuntimeError):
    """An attack returned inputs outside its eps ball or outside [0, 1] (a bug, not bad input)."""


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
    on_batch: Callable[[int, float], None] | None = None,
) -> list[AttackResult]:
    """The attack over all inputs at every eps, batch by batch; ``on_batch(images done, seconds
    so far)`` after each batch.

    An eps's wall time sums its calls of the attack and the bounds check (not the robust accuracy
    check); an attack that shares one run across epsilons gives every eps that run's time.
    """
    started_attack = time.perf_counter()
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
        if on_batch:
            on_batch(start + len(yb), time.perf_counter() - started_attack)
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


class ProgressLog:
    """Log lines to follow a long evaluation by, on a terminal and in a log file alike: one per
    batch of a long attack and one per attack and eps, with the time so far and an estimate of
    what is left (at the pace of the attacks run so far; results reused from the cache take no
    time and do not count towards the pace). ``cached``: how many of the ``total`` runs are known
    to be in the cache before the first starts; they do not count towards the time left."""

    def __init__(self, total: int, cached: int = 0) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.run, self.run_seconds, self.cached_left = 0, 0.0, cached

    def batch(self, attack: str, done: int, n: int, seconds: float) -> None:
        if done < n:
            left = seconds / done * (n - done)
            log.info(
                "%s: %d/%d images in %s, about %s left",
                attack,
                done,
                n,
                duration(seconds),
                duration(left),
            )

    def finished(self, results: Sequence[AttackResult], reused: bool = False) -> None:
        for r in results:
            self.done += 1
            if reused:
                self.cached_left = max(self.cached_left - 1, 0)
            else:
                self.run, self.run_seconds = self.run + 1, self.run_seconds + r.wall_time_s
            elapsed = time.perf_counter() - self.started
            left = self._left(max(self.total - self.done, 0), self.cached_left)
            how = "reused from the cache" if reused else f"{r.wall_time_s:.0f} s"
            log.info(
                "[%d/%d] %s %s eps=%g: robust %d/%d (%.1f%%), %s; %s elapsed, %s",
                self.done,
                self.total,
                r.attack,
                r.norm,
                r.eps,
                int(r.robust.sum()),
                len(r.robust),
                100 * r.robust.float().mean().item(),
                how,
                duration(elapsed),
                left,
            )

    def _left(self, to_go: int, cached: int) -> str:
        if to_go == 0:
            return "done"
        if to_go <= cached:
            return "the rest from the cache"
        if self.run == 0:
            return "time left unknown until an attack has run"
        return f"about {duration(self.run_seconds / self.run * (to_go - cached))} left"


class Evaluator:
    """One model and one set of inputs; runs attacks on them, through a cache when given one.

    ``cache``: a ``store.ResultCache`` (duck-typed: evaluate does not import the store);
    ``key(attack, epsilons, params)`` names what the results depend on.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        device: torch.device,
        n_examples: int = 8,
        cache: Any = None,
        key: Callable[[Attack, Sequence[float], Mapping[str, Any]], str] | None = None,
        progress: ProgressLog | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.x, self.y, self.batch_size, self.device = x, y, batch_size, device
        self.n_examples, self.cache, self.key = n_examples, cache, key
        self.progress = progress or ProgressLog(0)
        clean_preds = predict(self.model, x, batch_size, device)
        self.evaluation = Evaluation(clean_preds == y, clean_preds, x[:n_examples])

    def seconds_per_pass(self) -> float:
        """Seconds of one forward-backward pass per input, timed on one batch after a warm-up:
        the unit of ``Attack.passes``."""
        x = self.x[: self.batch_size].to(self.device)
        y = self.y[: self.batch_size].to(self.device)
        for _ in range(2):  # the first pass pays for one-time set-up (kernels, allocations)
            started = time.perf_counter()
            x.requires_grad_(True)
            loss = nn.functional.cross_entropy(self.model(x), y)
            torch.autograd.grad(loss, x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return (time.perf_counter() - started) / len(x)

    def run(
        self, attack: Attack, epsilons: Sequence[float], params: Mapping[str, Any] | None = None
    ) -> list[AttackResult]:
        """The attack at every eps: from the cache when it finished before, else run and saved."""
        key = self.key(attack, epsilons, params or {}) if self.key and self.cache else None
        warnings = getattr(attack, "warnings", None)  # the library's own checks, if it has any
        if key is not None and (cached := self.cache.load(attack.name, key)) is not None:
            results, saved_warnings = cached
            if warnings is not None:
                warnings += saved_warnings
            self.progress.finished(results, reused=True)
            return results
        log.info("%s: %d images at eps %s", attack.name, len(self.x), list(epsilons))
        results = run_attack(
            self.model,
            attack,
            self.x,
            self.y,
            epsilons,
            self.evaluation.clean_correct,
            self.batch_size,
            self.device,
            self.n_examples,
            lambda done, s: self.progress.batch(attack.name, done, len(self.x), s),
        )
        if key is not None:
            self.cache.save(attack.name, key, results, warnings or [])
        self.progress.finished(results)
        return results


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
    """Clean predictions, then every attack at every eps of its norm (no cache)."""
    evaluator = Evaluator(model, x, y, batch_size, device, n_examples)
    for attack in attacks.values():
        evaluator.evaluation.results += evaluator.run(attack, epsilons[attack.norm])
    return evaluator.evaluation


def success_rate(robust: torch.Tensor, clean_correct: torch.Tensor) -> float | None:
    n = int(clean_correct.sum())
    return None if n == 0 else 1.0 - int(robust.sum()) / n


def result_rows(
    results: Sequence[AttackResult], correct: torch.Tensor, params: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The report's ``results``: one row per attack and eps."""
    rows = []
    for r in results:
        fooled = correct & ~r.robust
        row = {
            "attack": r.attack,
            "kind": r.kind,
            "norm": r.norm,
            "eps": r.eps,
            "robust_acc": int(r.robust.sum()) / len(r.robust),
            "n_robust": int(r.robust.sum()),
            "success_rate": success_rate(r.robust, correct),
            "median_norm": r.norms[fooled].median().item() if fooled.any() else None,
            "wall_time_s": round(r.wall_time_s, 2),
            "images_per_s": (
                float(f"{len(r.robust) / r.wall_time_s:.4g}") if r.wall_time_s > 0 else None
            ),
            "params": params.get(r.attack, {}),
        }
        for key, value in r.extra.items():
            row[key] = value[correct].mean().item() if correct.any() else None
        rows.append(row)
    return rows
