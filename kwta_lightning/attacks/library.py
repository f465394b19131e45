"""Attacks from maintained libraries: foolbox 3, the reference AutoAttack (pyautoattack) and the
Adversarial Robustness Toolbox (ART).

Nothing here re-implements an attack; the wrappers only adapt calling conventions. Published
settings live in ``conf/attack/*.yaml``, next to their sources.
"""

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import foolbox as fb
import torch
from pyautoattack import AutoAttack as ReferenceAutoAttack
from pyautoattack.autopgd_base import APGDAttack
from pyautoattack.square import SquareAttack
from torch import nn

from kwta_lightning.attacks.base import Attack, AttackOutput, check_choice, project
from kwta_lightning.errors import ConfigError

AUTOATTACK_VERSIONS = ("standard", "rand")
APGD_LOSSES = ("ce", "dlr")
_LIBRARY_NORM = {"linf": "Linf", "l2": "L2"}
_ART_NORM = {"linf": "inf", "l2": 2}


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
    """A foolbox 3 attack; minimisation attacks (DeepFool, C&W, HSJ, Boundary) run once for all
    epsilons, and their adversarial is projected onto each eps ball in this attack's ``norm``,
    which may differ from the distance the attack minimises (C&W L2 or Boundary judged in L-inf,
    as the k-WTA paper judged them)."""

    def __init__(
        self, attack: fb.Attack, norm: str = "linf", kind: str = "gradient", name: str = ""
    ):
        super().__init__(norm, kind, name)
        self.fb_attack = attack
        self.shares_epsilons = isinstance(attack, fb.attacks.base.MinimizationAttack)

    def passes(self) -> float | None:
        """Gradient steps x DeepFool's candidates x C&W's binary search steps; the Boundary
        attack's forwards; HopSkipJump's queries depend on the run."""
        steps = getattr(self.fb_attack, "steps", None)
        if steps is None or isinstance(self.fb_attack, fb.attacks.HopSkipJumpAttack):
            return None
        if isinstance(self.fb_attack, fb.attacks.BoundaryAttack):
            return boundary_forwards(self.fb_attack) / 3
        candidates = getattr(self.fb_attack, "candidates", 1)
        return steps * candidates * getattr(self.fb_attack, "binary_search_steps", 1)

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float]
    ) -> list[AttackOutput]:
        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        if self.shares_epsilons:  # none of foolbox's minimisation attacks uses early_stop
            raw = self.fb_attack.run(fmodel, x, y).detach()
            return [AttackOutput(project(raw, x, eps, self.norm)) for eps in epsilons]
        _, clipped, _ = self.fb_attack(fmodel, x, y, epsilons=list(epsilons))
        return [AttackOutput(c.detach()) for c in clipped]

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        return self.run(model, x, y, [eps])[0]


def boundary_forwards(attack: fb.attacks.BoundaryAttack) -> float:
    """Forwards per input of foolbox's Boundary attack without ``init_attack``: a candidate each
    step and a spherical one every ``update_stats_every_k``; before them its default start,
    LinearSearchBlendedUniformNoiseAttack(steps=50): uniform noise until every input has an
    adversarial one (typically the first draw is counted), then up to 51 blends, and a check."""
    return attack.steps * (1 + 1 / attack.update_stats_every_k) + 1 + 51 + 1


class MomentumIterative(Attack):
    """Momentum iterative FGSM (MI-FGSM, Dong et al. 2018), ART's ``MomentumIterativeMethod``:
    sign steps along the accumulated L1-normalised CE gradient (decay ``decay``), projected on the
    eps ball, from the clean input; a step of ``rel_stepsize * eps``."""

    def __init__(
        self,
        steps: int = 10,
        rel_stepsize: float = 0.2,
        decay: float = 1.0,
        norm: str = "linf",
        kind: str = "gradient",
        name: str = "",
    ) -> None:
        super().__init__(norm, kind, name)
        if not 0 < rel_stepsize <= 1:
            raise ConfigError(f"attack {name}: rel_stepsize must be in (0, 1], got {rel_stepsize}")
        self.steps, self.rel_stepsize, self.decay = steps, rel_stepsize, decay

    def passes(self) -> float:
        return self.steps + 2 / 3  # ART predicts the clean and adversarial inputs to log a rate

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        if eps == 0:
            return AttackOutput(x.clone())
        # imported here: ART takes seconds to import; its INFO lines (a few per batch) are muted
        logging.getLogger("art").setLevel(logging.WARNING)
        from art.attacks.evasion import MomentumIterativeMethod
        from art.estimators.classification import PyTorchClassifier

        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            classifier = PyTorchClassifier(
                model,
                loss=nn.CrossEntropyLoss(),
                input_shape=tuple(x.shape[1:]),
                nb_classes=num_classes,
                clip_values=(0.0, 1.0),
                device_type="gpu" if x.is_cuda else "cpu",
            )
            mim = MomentumIterativeMethod(
                classifier,
                norm=_ART_NORM[self.norm],
                eps=eps,
                eps_step=self.rel_stepsize * eps,
                decay=self.decay,
                max_iter=self.steps,
                batch_size=len(x),
                verbose=False,
            )
            x_adv = mim.generate(x.detach().cpu().numpy(), y=y.cpu().numpy())
        model.zero_grad(set_to_none=True)  # ART's backward fills the parameters' gradients
        return AttackOutput(torch.from_numpy(x_adv).to(x.device, x.dtype))


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
