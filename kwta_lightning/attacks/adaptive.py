"""Attacks adapted to k-WTA's gradient masking (Tramer et al. 2020; Athalye et al. 2018).

k-WTA's output jumps whenever the set of winners changes, so the gradient at a point says little
about the loss a small step away. Three ways around it:

* ``EOTPGD``: estimate the gradient of a smoothed loss from the loss alone (antithetic Gaussian
  sampling, margin loss, sign steps), as Tramer et al. 2020 (section 5) broke k-WTA. foolbox's
  ``es_gradient_estimator`` is not used: it differences the loss summed over the batch, so each
  input's estimate picks up every other input's loss changes.
* ``BPDA``: forward through k-WTA, backward through a smooth surrogate (Athalye et al. 2018).
* ``Transfer``: adversarial inputs made on a surrogate model, evaluated on the target.
"""

import copy
from collections.abc import Callable, Sequence

import foolbox as fb
import torch
import torch.nn.functional as F
from torch import nn

from kwta_lightning.activations import KWTAChannel, kwta_layers, num_winners
from kwta_lightning.attacks.base import Attack, AttackOutput, margin_loss, project
from kwta_lightning.attacks.checkpoint import build_model, load_checkpoint
from kwta_lightning.attacks.library import FoolboxAttack
from kwta_lightning.errors import ConfigError

SURROGATES = ("relu", "soft_kwta")


class EOTPGD(Attack):
    """Linf PGD with sign steps on an antithetic-Gaussian estimate of the margin loss gradient.

    Each step draws ``samples // 2`` noise directions u and uses
    sum_u (L(x + sigma u) - L(x - sigma u)) u; inputs stop moving once misclassified. Steps are
    ``rel_stepsize * eps``: Tramer et al.'s 0.01 at eps 8/255 is 0.32 eps, and an absolute 0.01
    would need 30 steps just to reach MNIST's eps 0.3.
    """

    def __init__(
        self,
        steps: int = 100,
        rel_stepsize: float = 0.32,
        samples: int = 100,
        sigma: float = 8 / 255,
        chunk: int = 10,
        seed: int = 0,
        kind: str = "adaptive",
        name: str = "",
    ) -> None:
        super().__init__("linf", kind, name)
        if samples < 2:
            raise ConfigError(f"attack {name}: samples must be >= 2, got {samples}")
        self.steps, self.rel_stepsize, self.samples = steps, rel_stepsize, samples
        self.sigma, self.chunk, self.seed = sigma, chunk, seed

    @torch.no_grad()
    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        x_adv = x.clone()
        for _ in range(self.steps):
            active = (margin_loss(model(x_adv), y) <= 0).nonzero().squeeze(1)
            if len(active) == 0 or eps == 0:
                break
            grad = self._estimate(model, x_adv[active], y[active], generator)
            step = x_adv[active] + self.rel_stepsize * eps * grad.sign()
            x_adv[active] = project(step, x[active], eps, "linf")
        return AttackOutput(x_adv)

    def _estimate(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        grad = torch.zeros_like(x)
        pairs = self.samples // 2
        for start in range(0, pairs, self.chunk):
            n = min(self.chunk, pairs - start)
            u = torch.randn((n, *x.shape), generator=generator, device=x.device)
            probes = torch.cat([x + self.sigma * u, x - self.sigma * u]).clamp(0, 1)
            losses = margin_loss(model(probes.flatten(0, 1)), y.repeat(2 * n)).view(2, n, -1)
            diff = (losses[0] - losses[1]).view(n, len(x), *[1] * (x.dim() - 1))
            grad += (diff * u).sum(0)
        return grad


def replace_kwta(model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A copy of ``model`` with every k-WTA layer replaced by ``make(layer)``."""
    model = copy.deepcopy(model)
    for name, layer in kwta_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(layer))
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
        """x * sigmoid((x - threshold) / (temperature * spread)), threshold and spread detached."""
        per_channel = isinstance(self.kwta, KWTAChannel) and x.dim() >= 3
        groups = x.flatten(2) if per_channel else x.flatten(1)
        k = num_winners(self.kwta.gamma, groups.shape[-1])
        threshold = groups.topk(k, dim=-1).values.amin(-1, keepdim=True).detach()
        spread = groups.std(-1, keepdim=True).clamp_min(1e-6).detach()
        mask = torch.sigmoid((groups - threshold) / (self.temperature * spread))
        return (groups * mask).view_as(x)


class BPDA(Attack):
    """A foolbox attack on the target whose k-WTA layers back-propagate through a surrogate."""

    def __init__(
        self,
        attack: fb.Attack,
        surrogate: str = "relu",
        temperature: float = 0.1,
        kind: str = "adaptive",
        name: str = "",
    ) -> None:
        super().__init__("linf", kind, name)
        if surrogate not in SURROGATES:
            raise ConfigError(
                f"attack {name}: surrogate must be one of {', '.join(SURROGATES)}, "
                f"got {surrogate!r}"
            )
        self.inner = FoolboxAttack(attack, "linf", kind, name)
        self.shares_epsilons = self.inner.shares_epsilons
        self.surrogate, self.temperature = surrogate, temperature

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float]
    ) -> list[AttackOutput]:
        bpda = replace_kwta(model, lambda k: BPDALayer(k, self.surrogate, self.temperature))
        return self.inner.run(bpda, x, y, epsilons)

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> AttackOutput:
        return self.run(model, x, y, [eps])[0]


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
