"""Callbacks that change the network during training, and one that measures it per epoch.

* :class:`SparsityAnnealing`: gamma of every k-WTA layer follows a schedule of the epoch (the
  paper's incremental training); optionally a checkpoint per gamma reached.
* :class:`WarmStart`: the weights of a trained model (``init_from``) loaded before training.
* :class:`ReluToKWTA`: train with ReLU for ``relu_epochs``, then swap every ReLU for k-WTA and go on
  (the reproduction's workflow), optionally re-estimating BatchNorm statistics after the swap.
* :class:`TestEveryEpoch`: test accuracy before training and after each epoch, to a JSON file.
* :class:`BoostStrengthDecay`: the boost strength of Numenta's k-WTA layers decays each epoch.

When a callback changes the network (activation or gamma), the checkpoint callbacks forget their
best score: ``best.ckpt`` is then the best epoch of the network the run ends with, not an earlier
network's. Schedules are functions of the epoch, so a resumed run continues where it was.
"""

import json
import logging
import math
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from kwta_lightning.core.activations import check_gamma, ratio_layers
from kwta_lightning.core.backbones import RELU_MODULES
from kwta_lightning.core.gamma_schedules import GammaSchedule
from kwta_lightning.core.kwinners import KWinners
from kwta_lightning.errors import ConfigError

log = logging.getLogger(__name__)


# --- helpers -------------------------------------------------------------------------------------


def forget_best(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Make the checkpoint callbacks (and val/acc_best) start over: the network has changed.

    Each kept path stays in the top-k list with the worst possible score, so the next epoch
    overwrites ``best.ckpt`` in place instead of writing ``best-v1.ckpt``.
    """
    for checkpoint in trainer.checkpoint_callbacks:
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.monitor is None:
            continue
        # ModelCheckpoint has no public reset of its scores; its callback state (the public
        # state_dict/load_state_dict a resume goes through) is changed instead.
        state = checkpoint.state_dict()
        worst = torch.tensor(-math.inf if checkpoint.mode == "max" else math.inf)
        state["best_k_models"] = dict.fromkeys(state["best_k_models"], worst)
        state["kth_value"] = worst
        if state["best_k_models"]:
            state["best_model_score"] = worst
        checkpoint.load_state_dict(state)
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


def reestimate_batchnorm(pl_module: L.LightningModule, loader: DataLoader, batches: int) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over a few batches.

    Returns how many batches the statistics were computed from.
    """
    seen = 0

    def first_batches() -> Iterator[Any]:
        nonlocal seen
        for batch in islice(loader, batches):
            seen += 1
            yield batch

    update_bn(first_batches(), pl_module, device=pl_module.device)
    return seen


# --- callbacks -----------------------------------------------------------------------------------


class SparsityAnnealing(Callback):
    """Set gamma of every k-WTA layer to ``schedule(epoch)`` at the start of each epoch.

    The module logs gamma each epoch. With ``checkpoint_dir`` the end of each epoch is also saved
    as ``<checkpoint_dir>/gamma=0.100.ckpt`` (the last epoch trained at that gamma).
    """

    def __init__(self, schedule: GammaSchedule, checkpoint_dir: str | None = None) -> None:
        self.schedule = schedule
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gamma = round(self.schedule(trainer.current_epoch), 6)
        layers = ratio_layers(pl_module)
        if not layers or all(layer.gamma == gamma for layer in layers.values()):
            return
        pl_module.set_gamma(gamma)
        forget_best(trainer, pl_module)
        log.info("epoch %d: gamma %s", trainer.current_epoch, gamma)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = ratio_layers(pl_module)
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
    # Checked here, not left to load_state_dict(strict=True): that raises one multi-line
    # RuntimeError listing every key (over a hundred for a ResNet), and raises on a shape mismatch
    # even with strict=False, so it cannot give the one line below.
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
    pl_module.load_state_dict(saved, strict=True)
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


class BoostStrengthDecay(Callback):
    """Set the boost strength of every Numenta k-WTA layer (``act=kwinners``) to
    ``boost_strength * boost_strength_factor ** epoch`` at the start of each epoch: nupic's
    ``update_boost_strength()`` after each epoch. Nothing to do on a model without them."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for layer in pl_module.modules():
            if isinstance(layer, KWinners):
                layer.set_boost_epoch(trainer.current_epoch)
