"""Fast exact k-WTA: the selection, the masking and a backward that keeps little memory.

Semantics are the reference's (``activations.kwta_layerwise_topk``): a unit is kept when its value
is >= the k-th largest value of its group, ties included, and the kept units pass their value and
gradient. Two implementations, chosen per device by ``activations.kwta_layerwise``:

* ``RowThresholdKWTA`` (CPU): ``x >= t`` is ``x > nextafter(t, -inf)``, which is exactly what
  ``aten.threshold`` computes for a scalar threshold. Running it per sample writes the output in
  one pass and one allocation, as ReLU does (a broadcast compare-and-select needs a bool temporary
  and a second pass, and fresh large allocations page-fault on CPU). Backward reads the saved
  *output*, as ReLU's does: with t > 0 a unit was kept exactly when its output is >= t. That output
  is usually saved anyway by the next layer, so k-WTA adds no activation memory over ReLU. A sample
  whose threshold is <= 0 cannot be told apart this way (a kept zero looks like a dropped unit), so
  a batch holding one saves a bool mask instead.
* ``MaskedKWTA`` (any device, and channel-wise groups): one broadcast compare, ``where``, and only
  the bool mask saved for backward (1 byte per unit instead of the input and a float mask).

The selection is ``torch.topk(sorted=False)``. Measured on CPU against ``kthvalue``, a sample-then-
count bracket (``masked_select`` of the candidates) and a histogram on the float bit patterns
(``bincount``), topk was the fastest or tied at every size from 1e3 to 1e6 units per sample and
gamma 0.01-0.5: its quickselect runs in one C++ loop per row, while the others need several passes
and large temporaries in eager PyTorch (see the README's Performance section).
"""

import math

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

# Below this many units per sample the per-sample loop costs more in op calls than it saves.
MIN_UNITS_PER_ROW_LOOP = 4096


def memory_order_rows(x: torch.Tensor) -> torch.Tensor:
    """(batch, units) view of x in memory order, for contiguous and channels_last inputs."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1)


def kth_largest(groups: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last dimension (the keep threshold)."""
    return groups.topk(k, dim=-1, sorted=False).values.amin(dim=-1)


class RowThresholdKWTA(torch.autograd.Function):
    """Layer-wise k-WTA with one ``aten.threshold`` per sample (CPU); see the module docstring."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, k: int) -> torch.Tensor:
        threshold = kth_largest(memory_order_rows(x), k)
        below = torch.nextafter(threshold, threshold.new_tensor(float("-inf")))
        out = torch.empty_like(x)
        for x_row, out_row, value in zip(x, out, below.tolist(), strict=True):
            torch.ops.aten.threshold.out(x_row, value, 0, out=out_row)
        if bool((threshold > 0).all()):
            ctx.save_for_backward(out, below)
            ctx.from_output = True
        else:
            ctx.save_for_backward(x >= threshold.view(-1, *([1] * (x.dim() - 1))))
            ctx.from_output = False
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if not ctx.from_output:
            (mask,) = ctx.saved_tensors
            return torch.where(mask, grad, 0), None
        out, below = ctx.saved_tensors
        grad_in = torch.empty_like(out)
        backward_row = torch.ops.aten.threshold_backward.grad_input
        for grad_row, out_row, in_row, value in zip(
            grad, out, grad_in, below.tolist(), strict=True
        ):
            backward_row(grad_row, out_row, value, grad_input=in_row)
        return grad_in, None


class MaskedKWTA(torch.autograd.Function):
    """k-WTA per sample (or per sample and channel), saving only a bool mask for backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, k: int, per_channel: bool) -> torch.Tensor:
        threshold = kth_largest(x.flatten(2) if per_channel else memory_order_rows(x), k)
        mask = x >= threshold.view(*threshold.shape, *([1] * (x.dim() - threshold.dim())))
        ctx.save_for_backward(mask)
        return torch.where(mask, x, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0), None, None


def kwta_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Layer-wise k-WTA (per sample over all other dimensions) on the fastest exact path."""
    if x.device.type == "cpu" and math.prod(x.shape[1:]) >= MIN_UNITS_PER_ROW_LOOP:
        return RowThresholdKWTA.apply(x, k)
    return MaskedKWTA.apply(x, k, False)


def kwta_per_channel(x: torch.Tensor, k: int) -> torch.Tensor:
    """Channel-wise k-WTA of a (N, C, H, W) map: per sample and channel over H*W."""
    return MaskedKWTA.apply(x, k, True)
