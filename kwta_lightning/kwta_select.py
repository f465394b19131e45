"""Fast exact k-WTA: the selection, the masking and a backward that keeps little memory.

Semantics are the reference's (``activations.kwta_layerwise_topk``): a unit is kept when its value
is >= the k-th largest value of its group, ties included, and the kept units pass their value and
gradient. ``KWTAFunction`` computes the threshold, one compare and one ``where``, and keeps little
for backward:

* when every threshold is > 0 (the usual case: a k-WTA layer keeps its largest values), a unit
  was kept exactly when its output is nonzero, so backward is ReLU's backward on the saved
  *output*. That output is usually saved anyway by the next layer (a convolution keeps its
  input), so k-WTA then holds no more activation memory than ReLU;
* otherwise (a threshold <= 0, where a kept zero looks like a dropped unit) it saves only a bool
  mask, 1 byte per unit, instead of the input and a float mask.

A per-sample ``aten.threshold`` loop (one pass, no bool temporary) was measured too: it wins on an
idle CPU but loses badly on a busy one, where hundreds of small parallel regions per batch wait
on each other's threads.

The selection is ``torch.topk(sorted=False)``. Measured on CPU against ``kthvalue``, a sample-then-
count bracket (``masked_select`` of the candidates) and a histogram on the float bit patterns
(``bincount``), topk was the fastest or tied from 1e3 to 1e6 units per sample and gamma 0.01-0.5
(``benchmarks/kwta_selection.py``): its quickselect runs in one C++ loop per row, while the others
need several passes and large temporaries in eager PyTorch.
"""

import torch
from torch.autograd.function import FunctionCtx, once_differentiable


def memory_order_rows(x: torch.Tensor) -> torch.Tensor:
    """(batch, units) view of x in memory order, for contiguous and channels_last inputs."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1)


def kth_largest(groups: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last dimension (the keep threshold)."""
    return groups.topk(k, dim=-1, sorted=False).values.amin(dim=-1)


class KWTAFunction(torch.autograd.Function):
    """k-WTA per sample (or per sample and channel) that saves little for backward.

    With every threshold > 0 a unit was kept exactly when its output is nonzero, so backward is
    ReLU's (``threshold_backward(grad, out, 0)``) on the saved output; see the module docstring.
    Otherwise (or when ``check_positive`` is off, which spares CUDA a host sync) it saves the
    bool mask.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, k: int, per_channel: bool, check_positive: bool
    ) -> torch.Tensor:
        threshold = kth_largest(x.flatten(2) if per_channel else memory_order_rows(x), k)
        mask = x >= threshold.view(*threshold.shape, *([1] * (x.dim() - threshold.dim())))
        out = torch.where(mask, x, 0)
        ctx.from_output = check_positive and bool((threshold > 0).all())
        ctx.save_for_backward(out if ctx.from_output else mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (saved,) = ctx.saved_tensors
        if ctx.from_output:
            return torch.ops.aten.threshold_backward(grad, saved, 0), None, None, None
        return torch.where(saved, grad, 0), None, None, None


def kwta_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Layer-wise k-WTA: per sample over every other dimension."""
    return KWTAFunction.apply(x, k, False, x.device.type == "cpu")


def kwta_per_channel(x: torch.Tensor, k: int) -> torch.Tensor:
    """Channel-wise k-WTA of a (N, C, H, W) map: per sample and channel over H*W."""
    return KWTAFunction.apply(x, k, True, x.device.type == "cpu")
