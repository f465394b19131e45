"""Fast exact k-WTA: the selection, the masking and a backward that keeps little memory.

Semantics are the reference's (``activations.kwta_layerwise_topk``): a unit is kept when its value
is >= the k-th largest value of its group, ties included, and the kept units pass their value and
gradient. ``KWTAFunction`` finds the thresholds, masks, and keeps little for backward:

* when every threshold is > 0 (the usual case: a k-WTA layer keeps its largest values), a unit
  was kept exactly when its output is nonzero, so backward is ReLU's backward on the saved
  *output*. That output is usually saved anyway by the next layer (a convolution keeps its
  input), so k-WTA then holds no more activation memory than ReLU;
* otherwise (a threshold <= 0, where a kept zero looks like a dropped unit) it saves only a bool
  mask, 1 byte per unit, instead of the input and a float mask.

Two selections: ``select="auto"`` takes the kernel where it fits, ``select="torch"`` always
torch's topk (``act=kwta_torch``, for benchmarks):

* the kernel, on CPU for float32/bfloat16/float16 in contiguous or channels_last memory: a C++
  radix select (``csrc/kwta_cpu.cpp``) that finds each row's threshold from histograms of the
  float bits and masks the row while it is still in cache, on PyTorch's thread pool. It is
  compiled with torch's extension builder on first use (once per environment: the build folder
  is named after the environment, torch and the flags, see ``build_directory``). With the
  masking included it beats topk alone on wide rows and ties it on narrow ones
  (``benchmarks/kwta_selection.py`` measures it). When it cannot be built (no C++ compiler), a
  warning says so and torch's runs instead.
* torch's, everywhere else (CUDA, float64, other layouts): ``torch.topk(sorted=False)`` for the
  threshold, then one compare and a ``where``. On CPU it beat ``kthvalue``, a sample-then-count
  bracket and a ``bincount`` histogram in eager PyTorch; on CUDA topk is itself a radix select.

``inplace=True`` (used where the swapped ReLU was ``inplace``) writes the output into the input
like ``nn.ReLU(inplace=True)``: no new buffer per activation, which on CPU saves the page faults
of a fresh allocation. Autograd's version check guards it as it guards ReLU's.
"""

import functools
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

log = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).parent / "csrc" / "kwta_cpu.cpp"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# -fopenmp: at::parallel_for is inlined, and runs serially when compiled without it
KERNEL_FLAGS = ["-O3", "-fopenmp"]


def build_directory() -> Path | None:
    """Where the kernel is built: one folder per environment, torch version and flags.

    torch's default folder is one per user and extension name: two checkouts (two virtualenvs)
    then rebuild each other's kernel on every run, since the build file names the headers and
    libraries of the environment that wrote it last. None (torch's folder) when
    $TORCH_EXTENSIONS_DIR is set: the user chose where builds go. torch itself rebuilds when
    the source changes.
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    from torch.utils.cpp_extension import get_default_build_root

    key = "|".join([sys.prefix, torch.__version__, *KERNEL_FLAGS])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = Path(get_default_build_root()) / f"kwta_lightning_cpu-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.cache
def cpu_kernel() -> ModuleType | None:
    """The compiled C++ k-WTA kernel, or None (with a warning) when it cannot be built."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime"
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        folder = build_directory()
        kernel = load(
            "kwta_lightning_cpu",
            [str(KERNEL_SOURCE)],
            extra_cflags=KERNEL_FLAGS,
            build_directory=None if folder is None else str(folder),
        )
    except Exception as err:  # no compiler, no ninja, a failed build: fall back, loudly
        reason = f"{type(err).__name__}: {str(err).strip().partition(chr(10))[0]}"
        log.warning("k-WTA CPU kernel unavailable (%s); using torch.topk", reason)
        return None
    seconds = time.perf_counter() - started
    if seconds > 2:
        log.info("built the k-WTA CPU kernel in %.0f s (kept for later runs)", seconds)
    return kernel


def memory_order_rows(x: torch.Tensor) -> torch.Tensor:
    """(batch, units) view of x in memory order, for contiguous and channels_last inputs."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1)


def kth_largest(groups: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last dimension (the keep threshold), with torch.topk."""
    return groups.topk(k, dim=-1, sorted=False).values.amin(dim=-1)


def _kernel_rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor | None:
    """x's groups as rows of a contiguous view of its memory (the kernel writes there), or None."""
    # (batch, units) or (batch * channels, H * W)
    rows = x.reshape(-1, x.shape[2:].numel()) if per_channel else memory_order_rows(x)
    is_view = rows.is_contiguous() and rows.data_ptr() == x.data_ptr()
    return rows if is_view and x.is_contiguous(memory_format=_layout(x)) else None


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _kernel_fits(x: torch.Tensor, select: str) -> bool:
    on_cpu = x.device.type == "cpu" and x.dtype in KERNEL_DTYPES
    return select == "auto" and on_cpu and cpu_kernel() is not None


class KWTAFunction(torch.autograd.Function):
    """k-WTA per sample (or per sample and channel) that saves little for backward.

    With every threshold > 0 a unit was kept exactly when its output is nonzero, so backward is
    ReLU's (``threshold_backward(grad, out, 0)``) on the saved output; see the module docstring.
    Otherwise (or on CUDA, where checking the thresholds would wait for the device) it saves the
    bool mask.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, k: int, per_channel: bool, inplace: bool, select: str
    ) -> torch.Tensor:
        rows = _kernel_rows(x, per_channel) if _kernel_fits(x, select) else None
        out = x if inplace else None
        if rows is not None:  # rows with a threshold > 0 come back masked, the others unchanged
            out = x if inplace else torch.empty_like(x)  # the same strides: rows of it are a view
            thresholds = cpu_kernel().kwta_rows_out(rows, _kernel_rows(out, per_channel), k)
        else:
            thresholds = kth_largest(x.flatten(2) if per_channel else memory_order_rows(x), k)
        ctx.from_output = x.device.type == "cpu" and bool((thresholds > 0).all())
        shape = x.shape[: 2 if per_channel else 1]
        thresholds = thresholds.view(*shape, *([1] * (x.dim() - len(shape))))
        mask = None
        if out is None:
            mask = x >= thresholds
            out = torch.where(mask, x, 0)
        elif rows is None or not ctx.from_output:  # rows left to mask, in out
            mask = out >= thresholds
            out.masked_fill_(~mask, 0)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out if ctx.from_output else mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (saved,) = ctx.saved_tensors
        if ctx.from_output:
            return torch.ops.aten.threshold_backward(grad, saved, 0), None, None, None, None
        return torch.where(saved, grad, 0), None, None, None, None


def kwta_rows(x: torch.Tensor, k: int, inplace: bool = False, select: str = "auto") -> torch.Tensor:
    """Layer-wise k-WTA: per sample over every other dimension."""
    return KWTAFunction.apply(x, k, False, inplace, select)


def kwta_per_channel(
    x: torch.Tensor, k: int, inplace: bool = False, select: str = "auto"
) -> torch.Tensor:
    """Channel-wise k-WTA of a (N, C, H, W) map: per sample and channel over H*W."""
    return KWTAFunction.apply(x, k, True, inplace, select)
