"""Attacks from maintained libraries: foolbox 3 and the reference AutoAttack (pyautoattack).

Nothing here re-implements an attack; the wrappers only adapt calling conventions. Published
settings live in ``conf/attack/*.yaml``, next to their sources.
"""

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import foolbox as fb
import torch
from pyautoattack import AutoAttack as ReferenceAutoAttack
from pyautoattack.autopgd_base import APGDAttack
from pyautoattack.square import SquareAttack
from torch import nn

from kwta_lightning.attacks.base import Attack, AttackOutput, check_choice

AUTOATTACK_VERSIONS = ("standard", "rand")
APGD_LOSSES = ("ce", "dlr")
_LIBRARY_NORM = {"linf": "Linf", "l2": "L2"}


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() not in self.into:
            self.into.append(record.getMessage())


@contextmanager
def collect_warnings(logger: logging.Logger, into: list[str]) -> Iterator[None]:
    """The reference AutoAttack's checks (randomised model, logits range, zero gradients, Square
    beating APGD, ...) only log a warning; collect them so they reach the report."""
    handler = _Collect(into)
    logger.addHandler(handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class FoolboxAttack(Attack):
    """A foolbox 3 attack; minimisation attacks (DeepFool, C&W, HSJ) run once for all epsilons."""

    def __init__(
        self, attack: fb.Attack, norm: str = "linf", kind: str = "gradient", name: str = ""
    ):
        super().__init__(norm, kind, name)
        self.fb_attack = attack
        self.shares_epsilons = isinstance(attack, fb.attacks.base.MinimizationAttack)

    def passes(self) -> float | None:
        """Gradient steps x DeepFool's candidates x C&W's binary search steps; HopSkipJump's
        queries depend on the run."""
        steps = getattr(self.fb_attack, "steps", None)
        if steps is None or isinstance(self.fb_attack, fb.attacks.HopSkipJumpAttack):
            return None
        candidates = getattr(self.fb_attack, "candidates", 1)
        return steps * candidates * getattr(self.fb_attack, "binary_search_steps", 1)

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float]
    ) -> list[AttackOutput]:
        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        _, clipped, _ = self.fb_attack(fmodel, x, y, epsilons=list(epsilons))
        return [AttackOutput(c.detach()) for c in clipped]

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        return self.run(model, x, y, [eps])[0]


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020), the reference implementation from AutoAttack."""

    def __init__(
        self,
        n_queries: int = 5000,
        p_init: float = 0.8,
        n_restarts: int = 1,
        seed: int = 0,
        norm: str = "linf",
        kind: str = "black_box",
        name: str = "",
    ) -> None:
        super().__init__(norm, kind, name)
        self.n_queries, self.p_init, self.n_restarts, self.seed = (
            n_queries,
            p_init,
            n_restarts,
            seed,
        )

    def passes(self) -> float:
        return self.n_queries * self.n_restarts / 3  # forwards only

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        if eps == 0:
            return AttackOutput(x.clone())
        square = SquareAttack(
            model,
            norm=_LIBRARY_NORM[self.norm],
            n_queries=self.n_queries,
            eps=eps,
            p_init=self.p_init,
            n_restarts=self.n_restarts,
            seed=self.seed,
            loss="margin",
            resc_schedule=False,  # as AutoAttack runs it
            device=x.device,
        )
        with torch.no_grad():
            return AttackOutput(square.perturb(x, y).detach())


class APGD(Attack):
    """APGD (Croce and Hein 2020), the reference implementation from AutoAttack: PGD whose step
    adapts to the progress of the loss, with momentum and restarts; ``ce`` or ``dlr`` loss."""

    def __init__(
        self,
        loss: str = "ce",
        steps: int = 100,
        restarts: int = 1,
        seed: int = 0,
        norm: str = "linf",
        kind: str = "gradient",
        name: str = "",
    ) -> None:
        super().__init__(norm, kind, name)
        check_choice(name, "loss", loss, APGD_LOSSES)
        self.loss, self.steps, self.restarts, self.seed = loss, steps, restarts, seed
        self.warnings: list[str] = []

    def passes(self) -> float:
        return self.steps * self.restarts

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        if eps == 0:
            return AttackOutput(x.clone())
        logger = logging.getLogger(f"kwta_lightning.apgd.{self.name}")
        apgd = APGDAttack(
            model,
            n_iter=self.steps,
            norm=_LIBRARY_NORM[self.norm],
            n_restarts=self.restarts,
            eps=eps,
            seed=self.seed,
            loss=self.loss,
            device=x.device,
            logger=logger,
        )
        with collect_warnings(logger, self.warnings):
            x_adv = apgd.perturb(x, y)
        return AttackOutput(x_adv.detach())


class AutoAttack(Attack):
    """The reference AutoAttack (Croce and Hein 2020) through pyautoattack, unmodified.

    ``standard``: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries), 100
    iterations each; ``rand``: APGD-CE and APGD-DLR with 20 EOT samples, for randomised models.
    Only these versions are offered, so what is labelled AutoAttack is AutoAttack.
    """

    def __init__(
        self,
        version: str = "standard",
        seed: int = 0,
        norm: str = "linf",
        kind: str = "ensemble",
        name: str = "",
    ) -> None:
        super().__init__(norm, kind, name)
        check_choice(
            name,
            "version",
            version,
            AUTOATTACK_VERSIONS,
            " (a reduced AutoAttack is not AutoAttack)",
        )
        self.version, self.seed = version, seed
        self.warnings: list[str] = []

    def passes(self) -> float:
        """standard: APGD-CE, APGD-T and FAB-T (9 targets) 100 steps each, Square 5000 queries;
        rand: APGD-CE and APGD-DLR with 20 EOT samples. Each runs on the inputs still standing."""
        return 100 + 900 + 900 + 5000 / 3 if self.version == "standard" else 200 * 20

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        if eps == 0:
            return AttackOutput(x.clone())
        auto = ReferenceAutoAttack(
            model,
            norm=_LIBRARY_NORM[self.norm],
            eps=eps,
            version=self.version,
            seed=self.seed,
            device=x.device,
        )
        with collect_warnings(auto.logger, self.warnings):
            x_adv, _ = auto.run_standard_evaluation(x, y, batch_size=len(x))
        return AttackOutput(x_adv.detach())
