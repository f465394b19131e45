"""Training images/s of train.py's Lightning loop beside a plain PyTorch loop doing the same work.

    uv run python benchmarks/lightning_overhead.py             # model=cnn data=fake act=kwta
    uv run python benchmarks/lightning_overhead.py model=resnet18 --repeats 3
    uv run python benchmarks/lightning_overhead.py data.on_device=true   # batches on the device

Takes train.py's overrides. Both loops get the same composed config: the same data module (and
so the same data path, ``data.on_device`` included: both gather batches on the benchmark's
device) and a model built from the same seed, and run one training epoch each (forward,
cross-entropy, backward, optimizer step per batch; no validation), interleaved ``--repeats``
times. The Lightning loop also does what the LightningModule adds (training accuracy, logging):
that is part of what it costs. Prints images/s of both and Lightning's overhead in percent
(medians).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig

from kwta_lightning.errors import ConfigError
from kwta_lightning.run.console import exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["model=cnn", "data=fake", "act=kwta", "data.num_workers=0", "trainer=cpu"]
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16}


def compose_config(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=[*DEFAULTS, *overrides])
    except HydraException as err:
        raise ConfigError(f"overrides {' '.join(overrides)}: {err}") from err


def build(cfg: DictConfig):
    L.seed_everything(cfg.seed, verbose=False)
    return instantiate(cfg.model)


def plain_epoch(model: L.LightningModule, data, precision: str, device: torch.device) -> int:
    """One epoch of forward, loss, backward, step in a plain loop; returns the image count."""
    model = model.to(device).train()
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    dtype = PRECISIONS[precision]
    images = 0
    for x, y in data.train_dataloader():
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += len(x)
    return images


def lightning_trainer(cfg: DictConfig) -> L.Trainer:
    """train.py's Trainer for one epoch, without validation, logging to nowhere."""
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="train.py overrides (key=value)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        raise ConfigError(f"--repeats and --threads must be >= 1: {args.repeats}, {args.threads}")
    torch.set_num_threads(args.threads)
    cfg = compose_config(args.overrides)
    if str(cfg.trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}")
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    data = instantiate(cfg.data)
    data.device = device  # where data.on_device=true gathers batches for the plain loop too
    data.prepare_data()
    data.setup("fit")
    precision = str(cfg.trainer.precision)
    images = plain_epoch(build(cfg), data, precision, device)  # warm-up; the epoch's image count
    plain, lightning = [], []
    for _ in range(args.repeats):
        model = build(cfg)
        plain.append(images / timed(lambda m=model: plain_epoch(m, data, precision, device)))
        model, trainer = build(cfg), lightning_trainer(cfg)
        lightning.append(images / timed(lambda m=model, t=trainer: t.fit(m, datamodule=data)))
    result = {
        "images_per_epoch": images,
        "plain_images_per_s": statistics.median(plain),
        "lightning_images_per_s": statistics.median(lightning),
    }
    result["lightning_overhead_pct"] = 100 * (
        result["plain_images_per_s"] / result["lightning_images_per_s"] - 1
    )
    print(
        f"{' '.join([*DEFAULTS, *args.overrides])}: {images} images/epoch, "
        f"plain loop {result['plain_images_per_s']:.1f} images/s, "
        f"train.py (Lightning) {result['lightning_images_per_s']:.1f} images/s, "
        f"overhead {result['lightning_overhead_pct']:+.1f}% (median of {args.repeats})"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
