"""The LightningModule: a classifier whose checkpoint alone rebuilds it."""

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from kwta_lightning.activations import kwta_layers
from kwta_lightning.backbones import build_network

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9}


class KWTAClassifier(L.LightningModule):
    """Cross-entropy classifier over ``build_network(...)``.

    Every argument is a plain value and is saved as a hyper-parameter, so
    ``KWTAClassifier.load_from_checkpoint(path)`` rebuilds the same network. ``optimizer`` and
    ``scheduler`` are Hydra configs with ``_partial_: true`` (instantiated in
    ``configure_optimizers``); the default optimizer is the paper's SGD (lr 0.1, momentum 0.9).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        activation: str = "kwta",
        gamma: float = 0.1,
        small_input: bool = True,
        pretrained: bool = False,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(
            backbone,
            num_classes,
            in_channels,
            image_size,
            mean,
            std,
            activation,
            gamma,
            small_input,
            pretrained,
        )
        if compile:
            self.net.compile()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # forget the sanity-check batches

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        layers = kwta_layers(self.net)
        if layers:
            self.log("gamma", next(iter(layers.values())).gamma)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        if batch_idx == 0:
            self.log_dict(self.active_fractions(x))

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y))
        self.log("test/acc", self.test_acc)

    @torch.no_grad()
    def active_fractions(self, x: torch.Tensor) -> dict[str, float]:
        """Measured fraction of nonzero outputs of each k-WTA layer on a batch, and their mean."""
        outputs: dict[str, list[float]] = defaultdict(list)
        hooks = [
            layer.register_forward_hook(
                lambda _m, _i, out, name=name: outputs[name].append((out != 0).float().mean())
            )
            for name, layer in kwta_layers(self.net).items()
        ]
        try:
            self(x)
        finally:
            for hook in hooks:
                hook.remove()
        fractions = {f"active/{n}": torch.stack(v).mean().item() for n, v in outputs.items()}
        if fractions:
            fractions["active/mean"] = sum(fractions.values()) / len(fractions)
        return fractions

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer or DEFAULT_OPTIMIZER)(self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
