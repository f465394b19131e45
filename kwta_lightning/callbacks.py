"""Callbacks that change the network during training, and one that measures it per epoch.

* :class:`SparsityAnnealing`: gamma of every k-WTA layer follows a schedule of the epoch (the
  paper's incremental training); optionally a checkpoint per gamma reached.
* :class:`WarmStart`: the weights of a trained model (``init_from``) loaded before training.
* :class:`ReluToKWTA`: train with ReLU for ``relu_epochs``, then swap every ReLU for k-WTA and go on
  (the reproduction's workflow), optionally re-estimating BatchNorm statistics after the swap.
* :class:`TestEveryEpoch`: test accuracy before training and after each epoch, to a JSON file.
* :class:`LogProgress`: a log line every N steps and per epoch, which a log file shows as it
  happens (a progress bar written to a file shows only at the end).

When a callback changes the network (activation or gamma), the checkpoint callbacks forget their
best score: ``best.ckpt`` is then the best epoch of the network the run ends with, not an earlier
network's. Schedules are functions of the epoch, so a resumed run continues where it was.
"""

import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from kwta_lightning.activations import check_gamma, kwta_layers
from kwta_lightning.backbones import RELU_MODULES
from kwta_lightning.console import duration
from kwta_lightning.errors import ConfigError

log = logging.getLogger(__name__)


# --- schedules: epoch (0-based, the one about to start) -> gamma ---------------------------------


class Schedule(Protocol):
    def __call__(self, epoch: int) -> float: ...


def _check_epochs(epochs: int, name: str = "epochs") -> None:
    if epochs < 1:
        raise ConfigError(f"sparsity schedule: {name} must be >= 1, got {epochs}")


@dataclass(frozen=True)
class Linear:
    """gamma_start at epoch 0, linearly to gamma_end at epoch ``epochs``, then constant."""

    gamma_start: float
    gamma_end: float
    epochs: int

    def __post_init__(self) -> None:
        check_gamma(self.gamma_start), check_gamma(self.gamma_end), _check_epochs(self.epochs)

    def __call__(self, epoch: int) -> float:
        t = min(epoch / self.epochs, 1.0)
        return self.gamma_start + t * (self.gamma_end - self.gamma_start)


@dataclass(frozen=True)
class Step:
    """gamma_start to gamma_end in ``steps`` equal steps, evenly spaced over ``epochs`` epochs.

    Step(0.2, 0.1, epochs=4, steps=2): 0.2, 0.2, 0.15, 0.15, 0.1, 0.1, ...
    """

    gamma_start: float
    gamma_end: float
    epochs: int
    steps: int = 1

    def __post_init__(self) -> None:
        check_gamma(self.gamma_start), check_gamma(self.gamma_end)
        _check_epochs(self.epochs), _check_epochs(self.steps, "steps")

    def __call__(self, epoch: int) -> float:
        done = min(math.floor(epoch * self.steps / self.epochs), self.steps)
        return self.gamma_start + done / self.steps * (self.gamma_end - self.gamma_start)


@dataclass(frozen=True)
class Milestones:
    """``[[epoch, gamma], ...]``: each gamma holds from its epoch on; the first epoch is 0."""

    milestones: list[list[float]]

    def __post_init__(self) -> None:
        pairs = [tuple(m) for m in self.milestones]
        epochs = [e for e, _ in pairs]
        if (
            not pairs
            or any(len(p) != 2 for p in pairs)
            or epochs[0] != 0
            or epochs != sorted(epochs)
        ):
            raise ConfigError(
                f"sparsity milestones must be [[epoch, gamma], ...] with increasing epochs "
                f"starting at 0, got {self.milestones}"
            )
        for _, gamma in pairs:
            check_gamma(gamma)

    def __call__(self, epoch: int) -> float:
        return [g for e, g in self.milestones if e <= epoch][-1]


@dataclass(frozen=True)
class Paper:
    """The paper's rule: gamma_start, minus ``delta`` every ``every_n_epochs``, floored."""

    gamma_start: float
    delta: float
    every_n_epochs: int
    floor: float

    def __post_init__(self) -> None:
        check_gamma(self.gamma_start), check_gamma(self.floor)
        _check_epochs(self.every_n_epochs, "every_n_epochs")
        if self.delta <= 0:
            raise ConfigError(f"sparsity schedule: delta must be > 0, got {self.delta}")

    def __call__(self, epoch: int) -> float:
        return max(self.floor, self.gamma_start - self.delta * (epoch // self.every_n_epochs))


# --- helpers -------------------------------------------------------------------------------------


def forget_best(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Make the checkpoint callbacks (and val/acc_best) start over: the network has changed.

    Each kept path stays in the top-k list with the worst possible score, so the next epoch
    overwrites ``best.ckpt`` in place instead of writing ``best-v1.ckpt``.
    """
    for checkpoint in trainer.checkpoint_callbacks:
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.monitor is None:
            continue
        worst = torch.tensor(-math.inf if checkpoint.mode == "max" else math.inf)
        checkpoint.best_k_models = dict.fromkeys(checkpoint.best_k_models, worst)
        checkpoint.kth_value = worst
        if checkpoint.best_k_models:
            checkpoint.best_model_score = worst
    if hasattr(pl_module, "val_acc_best"):
        pl_module.val_acc_best.reset()


@torch.no_grad()
def accuracy(pl_module: L.LightningModule, loader: DataLoader) -> float:
    """Top-1 accuracy of the module in eval mode over a loader; the mode is restored after."""
    was_training = pl_module.training
    pl_module.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = x.to(pl_module.device), y.to(pl_module.device)
            correct += (pl_module(x).argmax(dim=1) == y).sum().item()
            total += len(y)
    finally:
        pl_module.train(was_training)
    return correct / total


@torch.no_grad()
def reestimate_batchnorm(pl_module: L.LightningModule, loader: DataLoader, batches: int) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over a few batches."""
    norms = [m for m in pl_module.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = pl_module.training
    pl_module.train()
    seen = 0
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
        for x, _ in islice(loader, batches):
            pl_module(x.to(pl_module.device))
            seen += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        pl_module.train(was_training)
    return seen


# --- callbacks -----------------------------------------------------------------------------------


def periodic_checkpoint(
    dirpath: str, minutes: float | None = 10, steps: int | None = None
) -> ModelCheckpoint | None:
    """last.ckpt every ``steps`` training steps, else every ``minutes`` (None when both are null).

    Besides the one at each epoch end, so a killed run loses at most that much work.
    """
    for name, value in (("minutes", minutes), ("steps", steps)):
        if value is not None and value <= 0:
            raise ConfigError(f"periodic_checkpoint.{name} must be > 0 or null, got {value}")
    if steps is None and minutes is None:
        return None
    every = (
        {"every_n_train_steps": steps}
        if steps is not None
        else {"train_time_interval": timedelta(minutes=minutes)}
    )
    return ModelCheckpoint(
        dirpath=dirpath, filename="last", enable_version_counter=False, save_top_k=1, **every
    )


class SparsityAnnealing(Callback):
    """Set gamma of every k-WTA layer to ``schedule(epoch)`` at the start of each epoch.

    The module logs gamma each epoch. With ``checkpoint_dir`` the end of each epoch is also saved
    as ``<checkpoint_dir>/gamma=0.100.ckpt`` (the last epoch trained at that gamma).
    """

    def __init__(self, schedule: Schedule, checkpoint_dir: str | None = None) -> None:
        self.schedule = schedule
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gamma = round(self.schedule(trainer.current_epoch), 6)
        layers = kwta_layers(pl_module)
        if not layers or all(layer.gamma == gamma for layer in layers.values()):
            return
        pl_module.set_gamma(gamma)
        forget_best(trainer, pl_module)
        log.info("epoch %d: gamma %s", trainer.current_epoch, gamma)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = kwta_layers(pl_module)
        if self.checkpoint_dir is None or not layers:
            return
        gamma = next(iter(layers.values())).gamma
        trainer.save_checkpoint(self.checkpoint_dir / f"gamma={gamma:.3f}.ckpt")


class WarmStart(Callback):
    """Load the weights of a trained model's checkpoint into the new model before training.

    The checkpoint may hold another activation or gamma (a ReLU model for a k-WTA one); its
    weights must match the model's names and shapes exactly. A resumed run (``ckpt_path``) keeps
    the resumed weights. ``init_from=None`` does nothing.
    """

    def __init__(self, init_from: str | None = None) -> None:
        self.init_from = init_from

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.init_from is None or stage != "fit" or trainer.ckpt_path is not None:
            return
        load_weights(pl_module, self.init_from)


def load_weights(pl_module: L.LightningModule, path: str) -> None:
    """Copy a checkpoint's ``state_dict`` into the module; ConfigError on any mismatch."""
    if not Path(path).is_file():
        raise ConfigError(f"init_from {path} does not exist (it needs a .ckpt file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["state_dict"]
    except Exception as err:  # unpickling and format errors come as many types
        raise ConfigError(
            f"init_from {path} is not a readable Lightning checkpoint: {err}"
        ) from err
    own = pl_module.state_dict()
    what = _describe(checkpoint.get("hyper_parameters", {}))
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise ConfigError(
            f"init_from {path} ({what}) does not fit this model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)"
        )
    for key, tensor in saved.items():
        if tensor.shape != own[key].shape:
            raise ConfigError(
                f"init_from {path} ({what}) does not fit this model: {key} has shape "
                f"{tuple(tensor.shape)} in the checkpoint, {tuple(own[key].shape)} in the model"
            )
    pl_module.load_state_dict(saved)
    log.info("initialised the weights from %s (%s)", path, what)


def _describe(hparams: dict[str, Any]) -> str:
    keys = ("backbone", "num_classes", "activation", "gamma")
    return ", ".join(f"{k}={hparams[k]}" for k in keys if k in hparams) or "no hyper-parameters"


class ReluToKWTA(Callback):
    """Train with ReLU for ``relu_epochs`` epochs, then swap every ReLU for ``activation``.

    The model must start as ReLU (``model.activation=relu``). At the swap the validation accuracy
    just before and just after it is logged (``switch/val_acc_before``, ``switch/val_acc_after``),
    after re-estimating BatchNorm statistics on ``bn_batches`` training batches when > 0.
    """

    def __init__(
        self, relu_epochs: int, activation: str = "kwta", gamma: float = 0.1, bn_batches: int = 0
    ) -> None:
        if relu_epochs < 0 or bn_batches < 0:
            raise ConfigError(
                f"relu_to_kwta needs relu_epochs >= 0 and bn_batches >= 0, got {relu_epochs} "
                f"and {bn_batches}"
            )
        if activation == "relu":
            raise ConfigError("relu_to_kwta: activation must be a k-WTA one, got 'relu'")
        self.relu_epochs, self.activation = relu_epochs, activation
        self.gamma, self.bn_batches = check_gamma(gamma), bn_batches

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.ckpt_path is None and pl_module.hparams.activation != "relu":
            raise ConfigError(
                "relu_to_kwta needs a model that starts with ReLU (model.activation=relu), "
                f"got model.activation={pl_module.hparams.activation}"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        has_relu = any(isinstance(m, RELU_MODULES) for m in pl_module.modules())
        if trainer.current_epoch < self.relu_epochs or not has_relu:
            return
        data = trainer.datamodule
        before = accuracy(pl_module, data.val_dataloader())
        pl_module.swap_to(self.activation, self.gamma)
        if self.bn_batches:
            reestimate_batchnorm(pl_module, data.train_dataloader(), self.bn_batches)
        after = accuracy(pl_module, data.val_dataloader())
        forget_best(trainer, pl_module)
        pl_module.log_dict({"switch/val_acc_before": before, "switch/val_acc_after": after})
        log.info(
            "epoch %d: swapped ReLU for %s(gamma=%s); val accuracy %.4f before, %.4f after",
            trainer.current_epoch,
            self.activation,
            self.gamma,
            before,
            after,
        )


class TestEveryEpoch(Callback):
    """Test accuracy before training (epoch 0) and after each epoch, saved to ``path`` (JSON).

    For learning curves; the run's final test of ``best.ckpt`` is unaffected.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.results: list[dict[str, float]] = []

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule, epochs: int) -> None:
        acc = accuracy(pl_module, trainer.datamodule.test_dataloader())
        self.results.append({"epochs_trained": epochs, "test_acc": acc})
        log.info("test accuracy after %d epochs: %.4f", epochs, acc)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.results, indent=2) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(trainer, pl_module, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(trainer, pl_module, trainer.current_epoch + 1)
        pl_module.log("test/acc_per_epoch", self.results[-1]["test_acc"])


# --- progress ------------------------------------------------------------------------------------


class LogProgress(Callback):
    """Training progress as log lines (to the console and train.log): every ``every_n_steps``
    training steps the loss, images/s and the epoch's time left; at each epoch's end its metrics
    and the run's time left, at the pace of the epochs this process ran."""

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = every_n_steps
        self.fit_started, self.epochs_run = 0.0, 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_started, self.epochs_run = time.perf_counter(), 0
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts in one

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_started, self.images, self.steps, self.loss_sum = time.perf_counter(), 0, 0, 0.0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach()
        self.images, self.steps = self.images + len(batch[0]), self.steps + 1
        self.loss_sum = self.loss_sum + loss  # a tensor: no device sync per step
        step, total = batch_idx + 1, trainer.num_training_batches  # step counts from a resume too
        if step % self.every_n_steps or step == total or not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self.epoch_started
        left = f", epoch done in about {duration(seconds / self.steps * (total - step))}"
        log.info(
            "epoch %d/%d step %d/%s: loss %.4f, %.0f images/s%s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            step,
            total if math.isfinite(total) else "?",
            float(loss),
            self.images / seconds,
            left if math.isfinite(total) else "",
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.epochs_run += 1
        elapsed = time.perf_counter() - self.fit_started
        to_go = trainer.max_epochs - trainer.current_epoch - 1
        # the epoch's train/ metrics reach callback_metrics only after this hook: the mean loss
        # of its steps stands in; val/ ran before it
        metrics = {"train/loss": float(self.loss_sum) / max(self.steps, 1)}
        metrics |= {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and v.numel() == 1
        }
        log.info(
            "epoch %d/%d done in %s: %s; %s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            duration(time.perf_counter() - self.epoch_started),
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            f"about {duration(elapsed / self.epochs_run * to_go)} left" if to_go > 0 else "done",
        )
