"""Test helpers: configs composed as the entry points compose them, CLI runs, real MNIST."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
MNIST_ROOT = Path(os.environ.get("KWTA_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
HAS_MNIST = (MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
needs_mnist = pytest.mark.skipif(
    not HAS_MNIST, reason=f"real MNIST not found in {MNIST_ROOT} (set KWTA_DATA_DIR)"
)


def compose_config(name: str, output_dir: Path, overrides: list[str]) -> DictConfig:
    """Compose conf/<name>.yaml with overrides as its entry point would; output in output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return cfg


def compose_train(output_dir: Path, overrides: list[str]) -> DictConfig:
    """Compose conf/train.yaml with overrides, as train.py would, writing into output_dir."""
    return compose_config("train", output_dir, overrides)


def run_cli(
    *args: str,
    script: str = "train.py",
    cwd: Path = ROOT,
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run an app as a user would: ``python train.py key=value ...`` for a script, or an
    installed command (``kwta-toy1d key=value ...``)."""
    return subprocess.run(
        [*command(script), *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def command(script: str) -> list[str]:
    """The argv that starts ``script``: a root script (``train.py``) or an installed command."""
    if script.endswith(".py"):
        return [sys.executable, str(ROOT / script)]
    return [str(Path(sys.executable).parent / script)]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment run_cli gives an entry point, with ``extra`` added."""
    return os.environ | {"KWTA_DATA_DIR": str(MNIST_ROOT), "WANDB_MODE": "offline"} | extra


def start_cli(*args: str, stderr_to: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start train.py in the background (to signal it); stderr goes to ``stderr_to``."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env or cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=stderr_to.open("w"),
    )


class SigkillIf(Callback):
    """Kill the training process outright (as the out-of-memory killer does) when gamma matches."""

    def __init__(self, gamma: float, kill_gamma: float) -> None:
        self.kill = gamma == kill_gamma

    def on_train_start(self, trainer, pl_module) -> None:
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalDuringValidation(Callback):
    """Send this process ``signum`` in the middle of validation after ``epoch``, unless ``done``
    exists (it is created then: the resumed run, same config, redoes that validation in peace)."""

    def __init__(self, signum: int, epoch: int, done: str) -> None:
        self.signum, self.epoch, self.done = signum, epoch, Path(done)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        fire = trainer.current_epoch == self.epoch and batch_idx == 1 and not self.done.exists()
        if fire and not trainer.sanity_checking:
            self.done.touch()
            os.kill(os.getpid(), self.signum)


def train_tiny_cnn(out: Path) -> Path:
    """Train a k-WTA CNN for a few batches of fake data into ``out``; return its best.ckpt."""
    from kwta_lightning.run.training import train

    overrides = ["data=fake", "data.image_size=16", "data.batch_size=16", "trainer=cpu"]
    train(compose_train(out, [*overrides, "logger=csv", "model=cnn", "act=kwta", "debug=limit"]))
    return out / "checkpoints" / "best.ckpt"
