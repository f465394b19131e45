"""Numenta's k-WTA: nupic.torch's ``KWinners`` and ``KWinners2d`` (Ahmad & Scheinkman 2019, "How
Can We Be So Dense?"), written from their documented behaviour, as the layer ``kwinners``.

What it adds to the paper's k-WTA (``activations.KWTA``):

* **boosting**: the winners are the k largest *boosted* values x * exp((k / N - duty) * strength),
  where ``duty`` is how often the unit (of a vector) or the channel (of a map) was active lately;
  the output keeps the unboosted x of the winners, and zero elsewhere. A rarely active unit is
  pushed up, a busy one down. Within a group the factor exp(k / N * strength) is the same for
  every unit, so the layer ranks by x * exp(-duty * strength), which picks the same winners;
* **duty cycles**, updated in training mode only, from the winners that came out > 0:
  duty = (duty * (period - B) + active) / period with period = min(duty_cycle_period, samples
  seen), B the batch size and ``active`` each unit's count of active samples in the batch (a
  channel's: its active positions over H*W);
* **the boost strength decays**: ``boost_strength * boost_strength_factor ** epoch`` in epoch
  ``epoch`` (``callbacks.BoostStrengthDecay`` sets it at the start of each epoch);
* **more winners at inference**: k = max(1, round(gamma * N)) in training mode and
  min(N, round(k * k_inference_factor)) in eval mode;
* on a map (N, C, H, W), winners over C*H*W per sample, or with ``local`` across the C channels
  at each position; a vector (N, F) is one group per sample either way;
* ties at the k-th largest boosted value all survive, as in the paper's k-WTA, unless
  ``break_ties`` keeps exactly k (torch.topk's choice among the tied).

The duty cycles, the current boost strength and the samples seen are buffers, saved in
checkpoints. The duty cycles take their size (C, or F) from the first input; a checkpoint's
size is taken when one is loaded into a layer that has not run yet. The layer never writes in
place. Winners pass their value and gradient, the others neither.
"""

import math
from typing import Any

import torch

from kwta_lightning.core.activations import Ungroup, _RatioKWTA
from kwta_lightning.errors import ConfigError


def _check(name: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"act.options.{name}={value!r}: must be {rule}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class KWinners(_RatioKWTA):
    """Numenta's k-WTA with boosting (see the module docstring); gamma is nupic's percent_on."""

    def __init__(
        self,
        gamma: float,
        *,
        k_inference_factor: float,
        boost_strength: float,
        boost_strength_factor: float,
        duty_cycle_period: int,
        local: bool,
        break_ties: bool,
    ) -> None:
        super().__init__(gamma)
        _check(
            "k_inference_factor",
            k_inference_factor,
            _number(k_inference_factor) and k_inference_factor >= 1,
            "a number >= 1",
        )
        _check(
            "boost_strength",
            boost_strength,
            _number(boost_strength) and boost_strength >= 0,
            "a number >= 0",
        )
        _check(
            "boost_strength_factor",
            boost_strength_factor,
            _number(boost_strength_factor) and 0 < boost_strength_factor <= 1,
            "a number > 0 and <= 1",
        )
        _check(
            "duty_cycle_period",
            duty_cycle_period,
            isinstance(duty_cycle_period, int)
            and not isinstance(duty_cycle_period, bool)
            and duty_cycle_period >= 1,
            "an integer >= 1",
        )
        _check("local", local, isinstance(local, bool), "true or false")
        _check("break_ties", break_ties, isinstance(break_ties, bool), "true or false")
        self.k_inference_factor = float(k_inference_factor)
        self.initial_boost_strength = float(boost_strength)
        self.boost_strength_factor = float(boost_strength_factor)
        self.duty_cycle_period = duty_cycle_period
        self.local, self.break_ties = local, break_ties
        self.register_buffer("boost_strength", torch.tensor(float(boost_strength)))
        self.register_buffer("duty_cycle", torch.zeros(0))  # sized by the first input
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))

    def winners(self, n: int) -> int:
        """k of a group of ``n`` units: more at inference (eval mode) than in training."""
        k = max(1, round(self.gamma * n))
        return k if self.training else min(n, round(k * self.k_inference_factor))

    def set_boost_epoch(self, epoch: int) -> None:
        """The boost strength of ``epoch`` (from 0): nupic's ``update_boost_strength()`` once
        after each epoch, as a function of the epoch so that a resumed run gets it right."""
        self.boost_strength.fill_(self.initial_boost_strength * self.boost_strength_factor**epoch)

    def ranking(self, x: torch.Tensor) -> tuple[torch.Tensor, Ungroup]:
        """The boosted values the winners are chosen by, one group per row of the last
        dimension (a sample's units, or with ``local`` a position's channels), and the function
        that puts rows of that shape back in x's shape."""
        boost = torch.exp(-self.boost_strength * self._duty_cycles(x.shape[1]))
        scores = x * boost.view(-1, *[1] * (x.dim() - 2))
        if self.local and x.dim() >= 3:
            return scores.movedim(1, -1), lambda rows: rows.movedim(-1, 1)
        return scores.flatten(1), lambda rows: rows.view_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            groups, ungroup = self.ranking(x)
            keep = ungroup(self._keep(groups, self.winners(groups.shape[-1])))
        out = torch.where(keep, x, 0)
        if self.training:
            self._update_duty_cycles(out)
        return out

    def _keep(self, groups: torch.Tensor, k: int) -> torch.Tensor:
        """Which units of each row win: the k largest, with every tie at the k-th or exactly k."""
        top = groups.topk(k, dim=-1, sorted=False)
        if self.break_ties:
            return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top.indices, True)
        return groups >= top.values.amin(-1, keepdim=True)

    def _duty_cycles(self, units: int) -> torch.Tensor:
        if self.duty_cycle.numel() == 0:
            self.duty_cycle.resize_(units).zero_()  # in place: the buffer stays the same tensor
        elif self.duty_cycle.numel() != units:
            raise ConfigError(
                f"kwinners keeps duty cycles for {self.duty_cycle.numel()} units and got an input "
                f"of {units}: one layer called at two places of different widths (a shared "
                "activation module) cannot keep one duty cycle per unit"
            )
        return self.duty_cycle

    @torch.no_grad()
    def _update_duty_cycles(self, out: torch.Tensor) -> None:
        batch = out.shape[0]
        if batch > self.duty_cycle_period:
            raise ConfigError(
                f"act.options.duty_cycle_period={self.duty_cycle_period} is smaller than the "
                f"batch ({batch}): the duty cycles need a period of at least one batch"
            )
        self.samples_seen += batch
        period = self.samples_seen.clamp(max=self.duty_cycle_period)  # on the device: no sync
        positions = math.prod(out.shape[2:])  # 1 for a vector
        active = (out > 0).sum(dim=[0, *range(2, out.dim())], dtype=torch.float) / positions
        self.duty_cycle.mul_(period - batch).add_(active).div_(period)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A checkpoint's duty cycles fit a layer that has not run yet (they are sized then)."""
        saved = state_dict.get(f"{prefix}duty_cycle")
        if saved is not None and self.duty_cycle.numel() == 0:
            self.duty_cycle.resize_(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, k_inference_factor={self.k_inference_factor}, "
            f"boost_strength={self.boost_strength.item():g}, "
            f"boost_strength_factor={self.boost_strength_factor}, "
            f"duty_cycle_period={self.duty_cycle_period}, local={self.local}"
            f"{', break_ties=True' if self.break_ties else ''}"
        )
