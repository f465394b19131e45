"""k-WTA's cost beside ReLU's: time per training step and per inference batch, peak memory.

    uv run python benchmarks/activation_overhead.py                      # ResNet18, CIFAR shape
    uv run python benchmarks/activation_overhead.py --backbone densenet121 --batch-size 32
    uv run python benchmarks/activation_overhead.py --epoch --data mnist --train-subset 2000

Variants: ReLU (the backbone as torchvision defines it), k-WTA at each ``--gamma`` with the
library's default (fastest exact) implementation (on CPU the C++ radix-select kernel), and at the
first gamma: the fast layer with torch.topk as its selection (``kwta_torch``, what CUDA runs), the
library's reference implementation (``kwta_topk``: topk threshold, broadcast compare, multiply)
and the paper's forward (topk, then the threshold repeated and permuted to the input's shape).
All variants run interleaved, repetition by repetition, in one process, so a noisy machine
slows them alike; the table gives medians and ratios to ReLU, and the JSON in
``benchmarks/results/`` keeps every repetition. ``--epoch`` times one training epoch and one
test-set pass over real data instead of one batch (as the reproduction's Table 3 did).

Peak training memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the peak of
live tensor storage during one training step (tracked op by op), plus the parameters, buffers
and optimizer state held before it.
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import rich
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import instantiate
from rich.progress import track
from rich.table import Table
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kwta_lightning.core.activations import check_gamma
from kwta_lightning.core.backbones import build_network, swap_relus
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.console import exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"train_s": 1.10, "infer_s": 1.25, "peak_train_mib": 1.10}


class PaperKWTA(nn.Module):
    """The paper's k-WTA forward, from its README: topk, the k-th value repeated and permuted."""

    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = math.prod(x.shape[1:])
        k = int(self.gamma * size)
        flat = x.view(x.shape[0], -1)
        kth = flat.topk(k, dim=1)[0][:, -1]
        kth = kth.repeat(flat.shape[1], 1).permute(1, 0).view_as(x)
        return (x >= kth).to(x) * x


@dataclass(frozen=True)
class Variant:
    label: str
    activation: str  # an activation registry name, or "paper"
    gamma: float

    def build(self, backbone: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        channels, size, _ = shape
        mean, std = [0.5] * channels, [0.25] * channels
        if self.activation != "paper":
            args = (backbone, num_classes, channels, size, mean, std, self.activation, self.gamma)
            return build_network(*args)
        net = build_network(backbone, num_classes, channels, size, mean, std, "relu")
        example = torch.rand(1, *shape)
        swapped, _ = swap_relus(net[1], lambda inplace: PaperKWTA(self.gamma), example, backbone)
        return nn.Sequential(net[0], swapped)


def variants(gammas: list[float]) -> list[Variant]:
    fast = [Variant(f"kwta g={g}", "kwta", g) for g in gammas]
    first = gammas[0]
    return [
        Variant("relu", "relu", first),
        *fast,
        Variant(f"kwta_torch g={first}", "kwta_torch", first),
        Variant(f"kwta_topk g={first}", "kwta_topk", first),
        Variant(f"paper g={first}", "paper", first),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once, counting storages created while active."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.live:
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._freed, key)
        return out


def held_bytes(net: nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = [*net.parameters(), *net.buffers()]
    tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.nbytes for t in tensors)


def peak_train_bytes(net, opt, x, y, device: torch.device) -> int:
    """Peak memory of one training step (after a first step has created the optimizer state)."""
    net.train()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        train_step(net, opt, x, y)
        return torch.cuda.max_memory_allocated(device)
    held = held_bytes(net, opt)
    with LiveTensorBytes() as tracker:
        train_step(net, opt, x, y)
    return held + tracker.peak


def inference(net: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        net(x)


def bench_steps(args, device: torch.device, backbone: str) -> dict[str, dict]:
    """Per variant: training-step and inference times (every repetition), peak training memory."""
    shape = (3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    models = {}
    for v in variants(args.gamma):
        torch.manual_seed(0)
        net = v.build(backbone, shape, 10).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        models[v.label] = (net, opt)
    results = {label: {"train_s": [], "infer_s": [], "peak_train_mib": None} for label in models}
    labels = list(models)
    rounds = args.warmup + args.repeats
    for r in track(range(rounds), description=f"{backbone} x{len(labels)} variants"):
        shift = r % len(labels)  # rotate the order so no variant always runs first
        for label in labels[shift:] + labels[:shift]:
            net, opt = models[label]
            net.train()
            train = timed(lambda net=net, opt=opt: train_step(net, opt, x, y), device)
            net.eval()
            infer = timed(lambda net=net: inference(net, x), device)
            if r >= args.warmup:
                results[label]["train_s"].append(train)
                results[label]["infer_s"].append(infer)
    for label, (net, opt) in models.items():
        results[label]["peak_train_mib"] = peak_train_bytes(net, opt, x, y, device) / 2**20
    return results


def data_module(args):
    overrides = [f"data={args.data}", "data.num_workers=0", f"data.batch_size={args.batch_size}"]
    overrides += [f"data.train_subset={args.train_subset}", f"data.test_subset={args.test_subset}"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except HydraException as err:
        raise ConfigError(f"--data {args.data}: {err}") from err
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    return data


def bench_epochs(args, device: torch.device, backbone: str) -> dict[str, dict]:
    """Per variant: one training epoch and one test-set pass over real data (every repetition)."""
    data = data_module(args)
    shape = (data.in_channels, data.image_size, data.image_size)
    models = {}
    for v in variants(args.gamma):
        torch.manual_seed(0)
        net = v.build(backbone, shape, data.num_classes).to(device)
        models[v.label] = (net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    results = {label: {"train_s": [], "infer_s": [], "peak_train_mib": None} for label in models}
    labels = list(models)

    def epoch(net, opt) -> None:
        net.train()
        for images, targets in data.train_dataloader():
            train_step(net, opt, images.to(device), targets.to(device))

    def test_pass(net) -> None:
        net.eval()
        for images, _ in data.test_dataloader():
            inference(net, images.to(device))

    for r in track(range(args.repeats), description=f"{backbone} epochs"):
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            net, opt = models[label]
            results[label]["train_s"].append(timed(lambda n=net, o=opt: epoch(n, o), device))
            results[label]["infer_s"].append(timed(lambda n=net: test_pass(n), device))
    return results


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    """Medians and ratios to ReLU per variant."""
    relu = results["relu"]
    base = {
        "train_s": statistics.median(relu["train_s"]),
        "infer_s": statistics.median(relu["infer_s"]),
        "peak_train_mib": relu["peak_train_mib"],
    }
    summary = {}
    for label, r in results.items():
        row = {
            "train_s": statistics.median(r["train_s"]),
            "infer_s": statistics.median(r["infer_s"]),
            "peak_train_mib": r["peak_train_mib"],
        }
        for key, value in list(row.items()):
            if value is not None:
                row[f"{key}_ratio"] = value / base[key]
        summary[label] = row
    return summary


def print_table(title: str, summary: dict[str, dict]) -> None:
    table = Table(title=title)
    for column in ("variant", "train s", "x relu", "infer s", "x relu", "peak MiB", "x relu"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for label, row in summary.items():
        cells = [label]
        for key in ("train_s", "infer_s", "peak_train_mib"):
            value = row[key]
            cells += ["-", "-"] if value is None else [f"{value:.3f}", f"{row[key + '_ratio']:.2f}"]
        table.add_row(*cells)
    rich.print(table)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return device.type


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except RuntimeError as err:
        raise ConfigError(f"--device {name}: {err}") from err
    return device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", nargs="+", default=["resnet18"], help="model name(s)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--gamma", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (medians)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, ...")
    parser.add_argument("--epoch", action="store_true", help="time a real epoch and test pass")
    parser.add_argument("--data", default="cifar10", help="--epoch: data config name")
    parser.add_argument("--train-subset", type=int, default=None, help="--epoch: train images")
    parser.add_argument("--test-subset", type=int, default=None, help="--epoch: test images")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    args.gamma = [check_gamma(g) for g in args.gamma]
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    mode = "epoch" if args.epoch else "step"
    report = {
        "mode": mode,
        "device": device_label(device),
        "date": date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/activation_overhead.py", *(argv or [])]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "targets": TARGETS,
        "backbones": {},
    }
    for backbone in args.backbone:
        bench = bench_epochs if args.epoch else bench_steps
        results = bench(args, device, backbone)
        summary = summarise(results)
        title = f"{backbone}, {mode}, batch {args.batch_size}, {report['device']}"
        print_table(f"{title}, {args.threads} threads, median of {args.repeats}", summary)
        report["backbones"][backbone] = {"summary": summary, "runs": results}
    suffix = "-epoch" if args.epoch else ""
    out = args.out or RESULTS / f"{report['device']}{suffix}-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
