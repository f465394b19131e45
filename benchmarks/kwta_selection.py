"""Candidates for k-WTA's selection (the k-th largest value per sample), timed side by side.

    uv run python benchmarks/kwta_selection.py                # batch 128, N 1e3..1e6, gamma .01-.5
    uv run python benchmarks/kwta_selection.py --sizes 65536 --gammas 0.1 --repeats 9

Each candidate returns the exact k-th largest value of every row of a (batch, N) float32 tensor
(checked against ``topk`` before timing); ReLU on the same tensor is the yardstick. Candidates:

* ``topk``: ``torch.topk(k, sorted=False)`` then the row minimum (what kwta_select uses);
* ``kthvalue``: ``torch.kthvalue(N - k + 1)``;
* ``bracket``: a strided sample's quantile bounds the threshold from below, the candidates above
  the bound are cut out with ``masked_select`` and counted, and ``kthvalue`` runs on them;
* ``radix``: a 4096-bucket histogram of the top 12 bits of the float bit patterns (``bincount``
  on the order-preserving integer keys), then the bucket holding the k-th value is searched with
  ``kthvalue``: a radix select's first level, done with eager ops;
* ``kernel``: the C++ radix select of ``kwta_lightning/core/csrc/kwta_cpu.cpp`` (what ``act=kwta``
  runs on CPU); it also writes the masked output, which the others leave out.

Candidates are interleaved per repetition; the table gives medians in ms.
"""

import argparse
import math
import statistics
import sys
import time

import rich
import torch
from rich.table import Table

from kwta_lightning.core.activations import check_gamma
from kwta_lightning.core.kwta_select import cpu_kernel
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.console import exit_on_user_error

BUCKET_BITS = 12


def by_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.topk(k, dim=1, sorted=False).values.amin(dim=1)


def by_kthvalue(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.kthvalue(x.shape[1] - k + 1, dim=1).values


def by_bracket(x: torch.Tensor, k: int, stride: int = 32, margin: float = 4.0) -> torch.Tensor:
    n = x.shape[1]
    sample = x[:, ::stride]
    m = sample.shape[1]
    p = k / n
    rank = min(m, math.ceil(p * m + margin * math.sqrt(p * (1 - p) * m)) + 1)
    low = sample.kthvalue(m - rank + 1, dim=1, keepdim=True).values
    keep = x >= low
    counts = keep.sum(dim=1).tolist()
    rows = x.masked_select(keep).split(counts)
    return torch.stack(
        [
            row.kthvalue(c - k + 1).values if c >= k else full.kthvalue(n - k + 1).values
            for row, c, full in zip(rows, counts, x, strict=True)
        ]
    )


def by_radix(x: torch.Tensor, k: int) -> torch.Tensor:
    bits = x.view(torch.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # integer order = float order
    buckets = (keys >> (32 - BUCKET_BITS)) + (1 << (BUCKET_BITS - 1))
    offsets = torch.arange(x.shape[0]).view(-1, 1) << BUCKET_BITS
    hist = torch.bincount((buckets + offsets).view(-1), minlength=x.shape[0] << BUCKET_BITS)
    hist = hist.view(x.shape[0], -1)
    at_or_above = hist.flip(1).cumsum(1).flip(1)  # units in this bucket or a higher one
    bucket = (at_or_above >= k).sum(1, keepdim=True) - 1  # the one holding the k-th largest
    above = (at_or_above.gather(1, bucket) - hist.gather(1, bucket)).view(-1)
    out = []
    for row, row_buckets, b, skip in zip(x, buckets, bucket.tolist(), above.tolist(), strict=True):
        inside = row[row_buckets == b[0]]
        out.append(inside.kthvalue(inside.numel() - (k - skip) + 1).values)
    return torch.stack(out)


def by_kernel(x: torch.Tensor, k: int) -> torch.Tensor:
    return cpu_kernel().kwta_rows_out(x, torch.empty_like(x), k)


CANDIDATES = {
    "topk": by_topk,
    "kthvalue": by_kthvalue,
    "bracket": by_bracket,
    "radix": by_radix,
    "kernel": by_kernel,
}


def time_ms(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return 1000 * (time.perf_counter() - start)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 65536, 1048576])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.repeats, args.threads, *args.sizes) < 1:
        raise ConfigError("--batch-size, --sizes, --repeats and --threads must be >= 1")
    gammas = [check_gamma(g) for g in args.gammas]
    torch.set_num_threads(args.threads)
    table = Table(title=f"k-th largest per row, ms (median of {args.repeats}, {args.threads} thr)")
    for column in ("rows x N", "gamma", "relu", *CANDIDATES):
        table.add_column(column, justify="right")
    results = {}
    for n in args.sizes:
        rows = max(1, min(args.batch_size, args.batch_size * 65536 // n))  # cap at 8.4M values
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(0))
        for gamma in gammas:
            k = max(1, int(gamma * n))
            expected = by_topk(x, k)
            for name, fn in CANDIDATES.items():
                if not torch.equal(fn(x, k), expected):
                    raise AssertionError(f"{name} disagrees with topk at N={n}, k={k}")
            timings = {"relu": [], **{name: [] for name in CANDIDATES}}
            for _ in range(args.repeats):  # interleaved
                timings["relu"].append(time_ms(torch.relu, x))
                for name, fn in CANDIDATES.items():
                    timings[name].append(time_ms(fn, x, k))
            row = {name: statistics.median(t) for name, t in timings.items()}
            results[f"{rows}x{n} gamma={gamma}"] = row
            table.add_row(f"{rows} x {n}", f"{gamma}", *(f"{v:.1f}" for v in row.values()))
    rich.print(table)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
