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
autograd). All give the same values and gradients. ``inplace=True`` overwrites the input like
``nn.ReLU(inplace=True)``; the backbone swap sets it where the replaced ReLU had it.
"""

import math
from collections.abc import Callable
from functools import partial

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


class _KWTA(nn.Module):
    """Shared part of the k-WTA layers: a sparsity ratio that can change on a live model."""

    def __init__(self, gamma: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma

    @property
    def gamma(self) -> float:
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = check_gamma(value)

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


class _FastKWTA(_KWTA):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kwta_channelwise(x, self.gamma, self.inplace, self.select)


class KWTATopK(_KWTA):
    """Layer-wise k-WTA with the reference implementation (for benchmarks and comparisons)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kwta_layerwise_topk(x, self.gamma)


class KWTAChannelTopK(_KWTA):
    """Channel-wise k-WTA with the reference implementation (for benchmarks and comparisons)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kwta_channelwise_topk(x, self.gamma)


ACTIVATIONS: dict[str, Callable[[float, bool], nn.Module]] = {
    "relu": lambda gamma, inplace: nn.ReLU(inplace),
    "kwta": KWTA,
    "kwta_channel": KWTAChannel,
    "kwta_torch": partial(KWTA, select="torch"),
    "kwta_channel_torch": partial(KWTAChannel, select="torch"),
    "kwta_topk": lambda gamma, inplace: KWTATopK(gamma),  # the reference never writes in place
    "kwta_channel_topk": lambda gamma, inplace: KWTAChannelTopK(gamma),
}


def make_activation(name: str, gamma: float = 0.1, inplace: bool = False) -> nn.Module:
    """Build the activation registered under ``name`` (gamma is ignored by ReLU)."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name](gamma, inplace)


def kwta_layers(model: nn.Module) -> dict[str, _KWTA]:
    """Every k-WTA layer of a model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _KWTA)}


def set_gamma(model: nn.Module, gamma: float) -> int:
    """Set gamma on every k-WTA layer of a live model; return how many layers changed."""
    gamma = check_gamma(gamma)
    layers = kwta_layers(model)
    for layer in layers.values():
        layer.gamma = gamma
    return len(layers)
