"""What every attack is: a function from (model, inputs, labels, epsilons) to adversarial inputs.

Inputs are pixels in [0, 1]; an attack returns, per eps, inputs within that eps of the originals
(in its norm, ``linf`` or ``l2``) and inside [0, 1]. ``kind`` says what the attack knows of the
model: ``gradient`` (white-box gradients), ``adaptive`` (built around k-WTA's masking),
``black_box`` (queries only), ``transfer`` (another model's gradients) or ``ensemble``
(AutoAttack). The diagnostics compare kinds.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kwta_lightning.errors import ConfigError

NORMS = ("linf", "l2")
KINDS = ("gradient", "adaptive", "black_box", "transfer", "ensemble")


def check_choice(attack: str, key: str, value: str, choices: Sequence[str], note: str = "") -> None:
    """ConfigError naming the attack, the key and the choices unless ``value`` is one of them."""
    if value not in choices:
        raise ConfigError(
            f"attack {attack}: {key} must be one of {', '.join(choices)}{note}, got {value!r}"
        )


@dataclass
class AttackOutput:
    """Adversarial inputs at one eps, and per-sample extras (averaged over correct inputs)."""

    x_adv: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class AttackResult:
    """One attack at one eps over all evaluated inputs: per-input outcomes (``robust``: correct
    clean and after the attack), perturbation sizes, and the first inputs for the examples plot."""

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


class Attack(ABC):
    """An attack with a norm and a kind; ``name`` is its key in the config.

    ``shares_epsilons``: one run serves every eps (a minimisation attack), so the evaluation calls
    ``run`` once with all of them; otherwise once per eps, to time each eps on its own.
    """

    shares_epsilons = False

    def __init__(self, norm: str = "linf", kind: str = "gradient", name: str = "") -> None:
        check_choice(name, "norm", norm, NORMS)
        check_choice(name, "kind", kind, KINDS)
        self.norm, self.kind, self.name = norm, kind, name

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float]
    ) -> list[AttackOutput]:
        """One output per eps; attacks that share one run across epsilons override this."""
        return [self.attack(model, x, y, eps) for eps in epsilons]

    @abstractmethod
    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        """Adversarial inputs for one eps."""

    def passes(self) -> float | None:
        """Its budget in forward-backward passes per input (a forward alone counts a third) for
        one eps (or one :meth:`run` of a minimisation attack); less where it stops early. None:
        not known in advance."""
        return None


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample Linf or L2 norm of x_adv - x."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the eps ball around x (in ``norm``) and into [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / norms).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
    return (x + delta).clamp(0.0, 1.0)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample largest other logit minus the true logit (> 0: misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(1) - true
