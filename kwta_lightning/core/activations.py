"""k-Winners-Take-All activations and the name-to-layer registry.

k-WTA keeps, per sample, the k largest values of a layer and zeroes the rest, with
k = max(1, floor(gamma * N)) computed as ``int(gamma * N)`` like the paper's code.
A value is kept when it is >= the k-th largest value, so:

* values are ranked signed: a negative value survives when it is among the k largest;
* ties at the threshold all survive (the paper's code does the same), so a layer can
  keep more than k units when several values equal the k-th largest.

The kept units pass their value and their gradient; the zeroed ones pass neither. The layers
keep the input's memory format (channels_last).

``kwta`` and ``kwta_channel`` run the fastest exact implementation for the input's device
(``kwta_lightning.core.kwta_select``: a C++ radix select on CPU, torch.topk elsewhere);
``kwta_torch`` and ``kwta_channel_torch`` force torch.topk's selection; ``kwta_topk`` and
``kwta_channel_topk`` run the reference (topk threshold, broadcast compare, multiply, plain
autograd). All give the same values and gradients. ``kwta_fixed`` and ``kwta_channel_fixed``
keep a fixed k instead of a ratio (``act=kwta_fixed act.options.k=50``). ``kwinners`` is
Numenta's k-WTA, with boosting (``kwta_lightning.core.kwinners``). ``inplace=True``
overwrites the input like ``nn.ReLU(inplace=True)``; the backbone swap sets it where the replaced
ReLU had it.
"""

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kwta_lightning.core.kwta_select import kwta_per_channel, kwta_rows, memory_order_rows
from kwta_lightning.errors import ConfigError


def check_gamma(gamma: float) -> float:
    """Return gamma as a float, or raise a ConfigError naming it when outside (0, 1]."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ConfigError(f"gamma must lie in (0, 1], got {gamma!r}")
    return float(gamma)


def num_winners(gamma: float, n: int) -> int:
    """k = max(1, floor(gamma * n)), with the paper's float arithmetic (int(gamma * n))."""
    return max(1, int(gamma * n))


Ungroup = Callable[[torch.Tensor], torch.Tensor]  # rows of a layer's groups back in its input shape


class _KWTA(nn.Module):
    """Shared part of every k-WTA layer: how many winners a group of ``n`` units keeps."""

    per_channel = False  # True: the groups are a sample's channels (H*W each), else the sample

    def winners(self, n: int) -> int:
        raise NotImplementedError

    def ranking(self, x: torch.Tensor) -> tuple[torch.Tensor, Ungroup]:
        """The values the layer ranks to pick its winners, one group per row of the last
        dimension, and the function that puts rows of that shape back in x's shape (BPDA's soft
        surrogate ranks the same groups)."""
        groups = x.flatten(2) if self.per_channel and x.dim() >= 3 else x.flatten(1)
        return groups, lambda rows: rows.view_as(x)


class _RatioKWTA(_KWTA):
    """A k-WTA layer whose k is a ratio gamma of its units, which can change on a live model."""

    def __init__(self, gamma: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma

    @property
    def gamma(self) -> float:
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = check_gamma(value)

    def winners(self, n: int) -> int:
        return num_winners(self.gamma, n)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


def kwta_layerwise_topk(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reference layer-wise k-WTA: topk threshold, broadcast compare, multiply (plain autograd)."""
    flat = memory_order_rows(x)
    k = num_winners(gamma, flat.shape[1])
    threshold = flat.topk(k, dim=1, sorted=False).values.amin(dim=1)
    return x * (x >= threshold.view(-1, *([1] * (x.dim() - 1))))


def kwta_channelwise_topk(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reference channel-wise k-WTA (layer-wise on a vector input), as kwta_layerwise_topk."""
    if x.dim() < 3:
        return kwta_layerwise_topk(x, gamma)
    flat = x.flatten(2)
    k = num_winners(gamma, flat.shape[2])
    threshold = flat.topk(k, dim=2, sorted=False).values.amin(dim=2)
    return x * (x >= threshold.view(*threshold.shape, *([1] * (x.dim() - 2))))


def kwta_layerwise(
    x: torch.Tensor, gamma: float, inplace: bool = False, select: str = "auto"
) -> torch.Tensor:
    """k-WTA per sample over every non-batch dimension (C*H*W for maps, F for vectors).

    Same values and gradients as ``kwta_layerwise_topk``, with the fastest exact implementation
    for x's device (``kwta_select``). Under torch.compile the reference formulation is traced
    instead: the compiler fuses its compare and multiply into one kernel.
    """
    if torch.compiler.is_compiling():
        return kwta_layerwise_topk(x, gamma)
    return kwta_rows(x, num_winners(gamma, math.prod(x.shape[1:])), inplace, select)


def kwta_channelwise(
    x: torch.Tensor, gamma: float, inplace: bool = False, select: str = "auto"
) -> torch.Tensor:
    """k-WTA per sample and channel over H*W; layer-wise on a vector input (N, F)."""
    if x.dim() < 3:
        return kwta_layerwise(x, gamma, inplace, select)
    if torch.compiler.is_compiling():
        return kwta_channelwise_topk(x, gamma)
    return kwta_per_channel(x, num_winners(gamma, math.prod(x.shape[2:])), inplace, select)


class _FastKWTA(_RatioKWTA):
    """A k-WTA layer on ``kwta_select``: optionally in place, with a choice of selection."""

    def __init__(self, gamma: float = 0.1, inplace: bool = False, select: str = "auto") -> None:
        super().__init__(gamma)
        self.inplace = inplace
        self.select = select  # "auto" (the fastest for the device) or "torch" (torch.topk)

    def extra_repr(self) -> str:
        inplace = ", inplace=True" if self.inplace else ""
        select = "" if self.select == "auto" else f", select={self.select}"
        return f"{super().extra_repr()}{inplace}{select}"


class KWTA(_FastKWTA):
    """Layer-wise k-WTA: per sample, over every non-batch dimension (C*H*W, or F)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kwta_layerwise(x, self.gamma, self.inplace, self.select)


class KWTAChannel(_FastKWTA):
    """Channel-wise k-WTA: per sample and channel, over H*W (layer-wise on vectors)."""

    per_channel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kwta_channelwise(x, self.gamma, self.inplace, self.select)


class KWTATopK(_RatioKWTA):
    """Layer-wise k-WTA with the reference implementation (for benchmarks and comparisons)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kwta_layerwise_topk(x, self.gamma)


class KWTAChannelTopK(_RatioKWTA):
    """Channel-wise k-WTA with the reference implementation (for benchmarks and comparisons)."""

    per_channel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kwta_channelwise_topk(x, self.gamma)


class KWTAFixed(_KWTA):
    """Fixed-k k-WTA (the paper's code has these beside the ratio layers): per sample, the k
    largest of every non-batch dimension, or with ``per_channel`` of each channel's H*W.

    The same k for every layer it replaces, whatever its size; a layer with k or fewer units is
    refused (k-WTA would keep all of it).
    """

    def __init__(
        self, k: int, per_channel: bool = False, inplace: bool = False, select: str = "auto"
    ) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"act.options.k={k!r}: must be an integer >= 1")
        self.k, self.per_channel, self.inplace, self.select = k, per_channel, inplace, select

    def winners(self, n: int) -> int:
        if n <= self.k:
            raise ConfigError(
                f"act.options.k={self.k}: a k-WTA layer here has only {n} units "
                f"{'per channel ' if self.per_channel else ''}(k must be fewer)"
            )
        return self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel and x.dim() >= 3:
            k = self.winners(math.prod(x.shape[2:]))
            return kwta_per_channel(x, k, self.inplace, self.select)
        return kwta_rows(x, self.winners(math.prod(x.shape[1:])), self.inplace, self.select)

    def extra_repr(self) -> str:
        channel = ", per_channel=True" if self.per_channel else ""
        return f"k={self.k}{channel}{', inplace=True' if self.inplace else ''}"


def _kwinners(
    gamma: float,
    inplace: bool,
    k_inference_factor: float = 1.5,
    boost_strength: float = 1.0,
    boost_strength_factor: float = 0.9,
    duty_cycle_period: int = 1000,
    local: bool = False,
    break_ties: bool = False,
) -> nn.Module:
    """Numenta's k-WTA with nupic.torch's defaults (gamma is its percent_on; never in place).

    Imported here, not at the top: ``kwinners`` builds on this module's base classes.
    """
    from kwta_lightning.core.kwinners import KWinners

    return KWinners(
        gamma,
        k_inference_factor=k_inference_factor,
        boost_strength=boost_strength,
        boost_strength_factor=boost_strength_factor,
        duty_cycle_period=duty_cycle_period,
        local=local,
        break_ties=break_ties,
    )


ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": lambda gamma, inplace: nn.ReLU(inplace),
    "kwta": lambda gamma, inplace: KWTA(gamma, inplace),
    "kwta_channel": lambda gamma, inplace: KWTAChannel(gamma, inplace),
    "kwta_torch": lambda gamma, inplace: KWTA(gamma, inplace, select="torch"),
    "kwta_channel_torch": lambda gamma, inplace: KWTAChannel(gamma, inplace, select="torch"),
    "kwta_topk": lambda gamma, inplace: KWTATopK(gamma),  # the reference never writes in place
    "kwta_channel_topk": lambda gamma, inplace: KWTAChannelTopK(gamma),
    "kwta_fixed": lambda gamma, inplace, k: KWTAFixed(k, inplace=inplace),  # gamma: unused
    "kwta_channel_fixed": lambda gamma, inplace, k: KWTAFixed(k, True, inplace),
    "kwinners": _kwinners,
}


def make_activation(
    name: str, gamma: float = 0.1, inplace: bool = False, options: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build the activation registered under ``name`` (gamma is ignored by ReLU and the fixed-k
    layers); ``options`` are its own arguments (``act.options``: ``k`` for the fixed-k layers)."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    factory, options = ACTIVATIONS[name], dict(options or {})
    parameters = inspect.signature(factory).parameters
    takes = [p for p in parameters if p not in ("gamma", "inplace")]
    unknown = sorted(set(options) - set(takes))
    missing = [p for p in takes if p not in options and parameters[p].default is inspect._empty]
    if unknown or missing:
        wants = f"takes act.options {', '.join(takes)}" if takes else "takes no act.options"
        raise ConfigError(f"activation {name} {wants}; got {', '.join(options) or 'none'}")
    return factory(gamma, inplace, **options)


def activation_label(name: str, options: Mapping[str, Any] | None = None) -> str:
    """The activation as results name it: ``kwta``, or with the options that differ from their
    defaults ``kwta_fixed(k=50)``, ``kwinners(local=True)``."""
    parameters = inspect.signature(ACTIVATIONS[name]).parameters if name in ACTIVATIONS else {}
    given = {
        key: value
        for key, value in (options or {}).items()
        if key not in parameters or parameters[key].default != value
    }
    return f"{name}({', '.join(f'{k}={v}' for k, v in given.items())})" if given else name


def uses_gamma(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether the activation takes its k from gamma (not ReLU, not the fixed-k layers)."""
    return isinstance(make_activation(name, options=options), _RatioKWTA)


def kwta_layers(model: nn.Module) -> dict[str, _KWTA]:
    """Every k-WTA layer of a model (ratio and fixed-k), by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _KWTA)}


def ratio_layers(model: nn.Module) -> dict[str, _RatioKWTA]:
    """The k-WTA layers whose k is a ratio gamma (those a gamma schedule can change)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _RatioKWTA)}


def set_gamma(model: nn.Module, gamma: float) -> int:
    """Set gamma on every ratio k-WTA layer of a live model; return how many layers changed."""
    gamma = check_gamma(gamma)
    layers = ratio_layers(model)
    for layer in layers.values():
        layer.gamma = gamma
    return len(layers)
