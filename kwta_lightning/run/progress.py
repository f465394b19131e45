"""Training progress as log lines, which a log file shows as they happen (a progress bar written
to a file shows only at the end)."""

import logging
import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from kwta_lightning.run.console import duration

log = logging.getLogger(__name__)


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
