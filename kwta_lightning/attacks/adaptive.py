"""Attacks adapted to k-WTA's gradient masking (Tramer et al. 2020; Athalye et al. 2018).

k-WTA's output jumps whenever the set of winners changes, so the gradient at a point says little
about the loss a small step away. Three ways around it:

* ``NESPGD``: estimate the gradient from the loss alone (antithetic Gaussian sampling, margin
  loss, sign steps), as Tramer et al. 2020 (section 5) broke k-WTA. foolbox's
  ``es_gradient_estimator`` is not used: it differences the loss summed over the batch, so each
  input's estimate picks up every other input's loss changes.
* ``BPDA``: forward through k-WTA, backward through a smooth surrogate (Athalye et al. 2018).
* ``Transfer``: adversarial inputs made on a surrogate model, evaluated on the target.
"""

import copy
from collections.abc import Callable, Sequence
from typing import Any

import foolbox as fb
import torch
import torch.nn.functional as F
from torch import nn

from kwta_lightning.attacks.base import Attack, AttackOutput, check_choice
from kwta_lightning.attacks.checkpoint import build_model, load_checkpoint
from kwta_lightning.attacks.library import FoolboxAttack
from kwta_lightning.attacks.pgd import PGD, per_sample_loss
from kwta_lightning.core.activations import kwta_layers
from kwta_lightning.errors import ConfigError

SURROGATES = ("relu", "soft_kwta")


class NESPGD(PGD):
    """PGD on an antithetic-Gaussian estimate of the loss gradient (Ilyas et al. 2018; Tramer et
    al. 2020 broke k-WTA with it): ``samples // 2`` noise directions u per step, the estimate
    sum_u (L(x + sigma u) - L(x - sigma u)) u.

    ``samples`` is one count per phase of the step schedule (before the first decay point, after
    each): late phases, with small steps and only the hard inputs left, get more samples, as
    Tramer et al. raise theirs from 100 to 1,000 to 20,000.
    """

    def __init__(
        self,
        samples: Sequence[int] = (100, 1000, 1000),
        sigma: float = 8 / 255,
        chunk: int = 10,
        loss: str = "margin",
        random_start: bool = False,
        kind: str = "adaptive",
        name: str = "",
        **pgd: Any,
    ) -> None:
        """``pgd``: the step schedule, restarts and momentum of ``PGD``."""
        super().__init__(loss=loss, random_start=random_start, kind=kind, name=name, **pgd)
        phases = len(self.decay_at) + 1
        samples = [samples] * phases if isinstance(samples, int) else list(samples)
        if len(samples) != phases or min(samples) < 2:
            raise ConfigError(
                f"attack {name}: samples must be {phases} counts >= 2 (one per "
                f"phase of decay_at {list(self.decay_at)}), got {samples}"
            )
        self.samples, self.sigma, self.chunk = samples, sigma, chunk

    def passes(self) -> float:
        forwards = sum(self.samples[self.phase(step)] for step in range(self.steps))
        return self.restarts * forwards / 3

    @torch.no_grad()
    def gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grad = torch.zeros_like(x)
        pairs = self.samples[self.phase(step)] // 2
        for start in range(0, pairs, self.chunk):
            n = min(self.chunk, pairs - start)
            u = torch.randn((n, *x.shape), generator=self.generator, device=x.device)
            # probes may leave [0, 1] by sigma: clamping them would bias the estimate at the
            # saturated pixels that MNIST is full of
            probes = torch.cat([x + self.sigma * u, x - self.sigma * u])
            logits = model(probes.flatten(0, 1))
            losses = per_sample_loss(logits, y.repeat(2 * n), self.loss).view(2, n, -1)
            diff = (losses[0] - losses[1]).view(n, len(x), *[1] * (x.dim() - 1))
            grad += (diff * u).sum(0)
        return grad, model(x).argmax(1)


def replace_kwta(model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A copy of ``model`` with every k-WTA layer replaced by ``make(layer)``."""
    model = copy.deepcopy(model)
    for name, layer in kwta_layers(model).items():
        model.set_submodule(name, make(layer))
    return model


class BPDALayer(nn.Module):
    """k-WTA forward, surrogate backward: surrogate(x) + (kwta(x) - surrogate(x)).detach()."""

    def __init__(self, kwta: nn.Module, surrogate: str, temperature: float) -> None:
        super().__init__()
        self.kwta, self.surrogate, self.temperature = kwta, surrogate, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smooth = F.relu(x) if self.surrogate == "relu" else self._soft_kwta(x)
        with torch.no_grad():  # on a copy: the k-WTA layer may write into its input (in place)
            hard = self.kwta(x.clone())
        return smooth + (hard - smooth).detach()

    def _soft_kwta(self, x: torch.Tensor) -> torch.Tensor:
        """x * sigmoid((score - threshold) / (temperature * spread)), threshold and spread
        detached, in each group the layer picks its winners in (``ranking``): the score is what
        it ranks, x itself, or for Numenta's k-WTA x boosted, in its local groups when so."""
        groups, ungroup = self.kwta.ranking(x)
        k = self.kwta.winners(groups.shape[-1])
        threshold = groups.topk(k, dim=-1).values.amin(-1, keepdim=True).detach()
        spread = groups.std(-1, keepdim=True).clamp_min(1e-6).detach()
        return x * ungroup(torch.sigmoid((groups - threshold) / (self.temperature * spread)))


class BPDA(Attack):
    """PGD on the target whose k-WTA layers back-propagate through a surrogate.

    With ``soft_kwta`` the surrogate's temperature is swept: each temperature's run attacks the
    inputs that the earlier ones did not fool, so no single guess decides the result.
    """

    def __init__(
        self,
        attack: PGD,
        surrogate: str = "soft_kwta",
        temperatures: Sequence[float] = (0.05, 0.1, 0.2, 0.5),
        kind: str = "adaptive",
        name: str = "",
    ) -> None:
        super().__init__("linf", kind, name)
        check_choice(name, "surrogate", surrogate, SURROGATES)
        if surrogate == "soft_kwta" and (not temperatures or min(temperatures) <= 0):
            raise ConfigError(
                f"attack {name}: temperatures must be a non-empty list of numbers > 0, "
                f"got {list(temperatures)}"
            )
        self.inner, self.surrogate = attack, surrogate
        self.temperatures = list(temperatures) if surrogate == "soft_kwta" else [1.0]

    def passes(self) -> float:
        return self.inner.passes() * len(self.temperatures)  # each on the inputs still standing

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        x_best = x.clone()
        todo = torch.arange(len(x), device=x.device)
        temperatures = self.temperatures if kwta_layers(model) else self.temperatures[:1]
        for temperature in temperatures:
            if len(todo) == 0:
                break
            bpda = replace_kwta(model, lambda k, t=temperature: BPDALayer(k, self.surrogate, t))
            self.inner.name = f"{self.name} temperature {temperature:g}"  # in its progress lines
            x_adv = self.inner.attack(bpda, x[todo], y[todo], eps).x_adv
            with torch.no_grad():
                fooled = model(x_adv).argmax(1) != y[todo]
            x_best[todo[fooled]] = x_adv[fooled]
            todo = todo[~fooled]
        return AttackOutput(x_best)


class Transfer(Attack):
    """A foolbox attack on a surrogate: ``surrogate_ckpt`` (e.g. the ReLU twin), or by default
    the target's own weights with every k-WTA layer swapped for ReLU."""

    def __init__(
        self,
        attack: fb.Attack,
        surrogate_ckpt: str | None = None,
        kind: str = "transfer",
        name: str = "",
    ) -> None:
        super().__init__("linf", kind, name)
        self.inner = FoolboxAttack(attack, "linf", kind, name)
        self.shares_epsilons = self.inner.shares_epsilons
        self.surrogate_ckpt = surrogate_ckpt
        self._loaded: nn.Module | None = None

    def passes(self) -> float | None:
        return self.inner.passes()  # on the surrogate, which is the target's size or smaller

    def surrogate_for(self, model: nn.Module) -> nn.Module:
        if self.surrogate_ckpt is None:
            return replace_kwta(model, lambda _: nn.ReLU())
        if self._loaded is None:
            self._loaded = build_model(load_checkpoint(self.surrogate_ckpt))
        return self._loaded

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float]
    ) -> list[AttackOutput]:
        surrogate = self.surrogate_for(model).to(x.device).eval()
        return self.inner.run(surrogate, x, y, epsilons)

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        return self.run(model, x, y, [eps])[0]
