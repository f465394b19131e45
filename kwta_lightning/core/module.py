"""The LightningModule: a classifier whose checkpoint alone rebuilds it."""

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import foolbox as fb
import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics import MaxMetric, MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from kwta_lightning.core.activations import (
    check_gamma,
    kwta_layers,
    make_activation,
    ratio_layers,
    set_gamma,
)
from kwta_lightning.core.backbones import build_network, swap_activations, swap_targets
from kwta_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# Metrics that add up over an epoch (or the run): their states travel in the checkpoint, so an
# epoch resumed part-way logs what the whole epoch would have.
RESUMED_METRICS = ("train_loss", "train_acc", "train_adv_acc", "val_acc_best")

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9}


ADV_TRAIN_METHODS = ("pgd", "trades", "free")  # validation.py writes them out (pinned by a test)


@dataclass(frozen=True)
class AdvTrain:
    """Adversarial training; the defaults are the k-WTA paper's for CIFAR.

    ``method``: ``pgd`` (Madry et al.: train on L-inf PGD examples), ``trades`` (Zhang et al.
    2019: CE(f(x), y) + ``beta`` * KL(f(x) || f(x')), x' maximising that KL) or ``free``
    (Shafahi et al. 2019: each minibatch replayed ``replays`` times, one backward pass giving
    both the weight update and the perturbation's, see :meth:`KWTAClassifier.optimizer_step`).
    The paper's eps per data set: 0.031 CIFAR, 0.047 SVHN, 0.3 MNIST (step 0.007, 10-20 steps);
    pgd and trades take ``step_size`` and ``steps``, free steps its perturbation by ``eps``.
    pgd only: ``random_start``; ``target="predicted"`` attacks the model's own prediction instead
    of the true label (no label leaking, Kurakin et al.); ``mix`` weighs the adversarial loss,
    ``1 - mix`` the clean loss.
    """

    enabled: bool = False
    method: Literal["pgd", "trades", "free"] = "pgd"
    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10
    random_start: bool = True
    target: Literal["label", "predicted"] = "label"
    mix: float = 1.0
    beta: float = 6.0
    replays: int = 8

    def __post_init__(self) -> None:
        if self.method not in ADV_TRAIN_METHODS:
            raise ConfigError(
                f"adv_train.method must be one of {', '.join(ADV_TRAIN_METHODS)}, "
                f"got {self.method!r}"
            )
        if self.eps <= 0 or self.step_size <= 0 or self.steps < 1:
            raise ConfigError(
                f"adv_train needs eps > 0, step_size > 0, steps >= 1; got eps={self.eps}, "
                f"step_size={self.step_size}, steps={self.steps}"
            )
        if self.target not in ("label", "predicted"):
            raise ConfigError(
                f"adv_train.target must be 'label' or 'predicted', got {self.target!r}"
            )
        if not 0 <= self.mix <= 1:
            raise ConfigError(f"adv_train.mix must lie in [0, 1], got {self.mix}")
        if not self.beta > 0:
            raise ConfigError(f"adv_train.beta must be > 0, got {self.beta}")
        if isinstance(self.replays, bool) or not isinstance(self.replays, int) or self.replays < 1:
            raise ConfigError(f"adv_train.replays must be an integer >= 1, got {self.replays}")
        if self.method != "pgd" and (self.target != "label" or self.mix != 1):
            raise ConfigError(
                f"adv_train.target={self.target} mix={self.mix}: target and mix are method=pgd's "
                f"(method={self.method} takes target=label, mix=1.0)"
            )


def _adv_train(options: Mapping[str, Any] | None) -> AdvTrain:
    try:
        return AdvTrain(**(options or {}))
    except TypeError as err:  # an unknown key
        raise ConfigError(f"adv_train: {err}") from None


def trades_loss(
    logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float
) -> torch.Tensor:
    """TRADES' training loss: CE(f(x), y) + beta * KL(f(x) || f(x')), the KL summed over classes
    and averaged over the batch (Zhang et al.'s ``(1 / batch_size) * KLDivLoss(sum)``)."""
    robust = F.kl_div(
        F.log_softmax(adv_logits, dim=1), F.softmax(logits, dim=1), reduction="batchmean"
    )
    return F.cross_entropy(logits, y) + beta * robust


class _TradesPGD(fb.attacks.LinfPGD):
    """foolbox's L-inf PGD (sign steps, projection onto the eps ball and [0, 1]) on TRADES' inner
    problem: maximise KL(f(x) || f(x')) from x' = x + 0.001 * N(0, 1). The loss and the start
    are the two steps foolbox documents for overriding; the clean probabilities are the target."""

    def __init__(self, clean_probs: torch.Tensor, step_size: float, steps: int) -> None:
        super().__init__(abs_stepsize=step_size, steps=steps, random_start=True)
        self.clean_probs = clean_probs

    def get_loss_fn(self, model: fb.Model, labels: Any) -> Any:
        def loss_fn(inputs: Any) -> Any:  # eagerpy tensors wrapping torch's (.raw)
            log_q = F.log_softmax(model(inputs).raw, dim=1)
            return type(inputs)(F.kl_div(log_q, self.clean_probs, reduction="sum"))

        return loss_fn

    def get_random_start(self, x0: Any, epsilon: float) -> Any:
        return type(x0)(x0.raw + 0.001 * torch.randn_like(x0.raw))


class KWTAClassifier(L.LightningModule):
    """Cross-entropy classifier over ``build_network(...)``.

    Every argument is a plain value and is saved as a hyper-parameter, so
    ``KWTAClassifier.load_from_checkpoint(path)`` rebuilds the same network. ``optimizer`` and
    ``scheduler`` are Hydra configs with ``_partial_: true`` (instantiated in
    ``configure_optimizers``); the default optimizer is the paper's SGD (lr 0.1, momentum 0.9).
    ``adv_train`` holds the fields of :class:`AdvTrain` (PGD, TRADES or free adversarial training
    when enabled). ``backbone_options`` are a custom backbone's options (``{"depth": 10}`` for
    ``wrn22``, the model config's ``model.backbone_options``); None, as in checkpoints written
    before it existed, is none. ``swap`` lists the activation kinds the activation replaces
    (``model.swap``; ``("relu",)``, as in checkpoints written before it existed).

    The activation and gamma can change during training (:meth:`swap_to`, :meth:`set_gamma`, used
    by the callbacks); they update the saved hyper-parameters, so a checkpoint records the network
    it holds, and loading one into a live module rebuilds the network it describes.
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
        adv_train: Mapping[str, Any] | None = None,
        backbone_options: Mapping[str, Any] | None = None,
        activation_options: Mapping[str, Any] | None = None,
        swap: Sequence[str] = ("relu",),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.adv = _adv_train(adv_train)
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
            backbone_options,
            activation_options,
            swap,
        )
        if compile:
            self.net.compile()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.train_adv_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss = MeanMetric()
        self._metric_states_to_load: dict[str, Any] | None = None
        self._free_delta: torch.Tensor | None = None  # free training's perturbation
        self._replay = 0  # which replay of the minibatch free training is at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # forget the sanity-check batches
        if self._metric_states_to_load is not None:  # a resumed run: the states it had
            for name, saved in self._metric_states_to_load.items():
                _set_metric_state(getattr(self, name), saved)
            self._metric_states_to_load = None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        method = self.adv.method if self.adv.enabled else None
        if method == "free":
            return self._free_training_step(x, y)
        # TRADES' x' first, as Zhang et al.: the attack sees the BatchNorm statistics from
        # before this batch's training passes
        x_trades = self.trades_examples(x, y) if method == "trades" else None
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc.update(logits, y)
        if method == "pgd":
            adv_logits = self(self.adversarial_examples(x, y))
            loss = (1 - self.adv.mix) * loss + self.adv.mix * F.cross_entropy(adv_logits, y)
            self.train_adv_acc.update(adv_logits, y)
        elif method == "trades":
            adv_logits = self(x_trades)
            loss = trades_loss(logits, adv_logits, y, self.adv.beta)
            self.train_adv_acc.update(adv_logits, y)
        self.train_loss.update(loss.detach(), weight=len(y))
        self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def _free_training_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One replay of free training: the loss at x + delta; its backward pass fills the
        weights' gradients and delta's (used by :meth:`on_after_backward`)."""
        if self._replay == 0:  # clean accuracy, once a minibatch: no gradient, and in eval
            # mode so that it leaves the BatchNorm statistics alone
            self.net.eval()
            with torch.no_grad():
                self.train_acc.update(self(x), y)
            self.net.train()
        if self._free_delta is None or self._free_delta.shape != x.shape:
            self._free_delta = torch.zeros_like(x)  # the first batch, or a smaller last one
        delta = self._free_delta.requires_grad_(True)
        adv_logits = self((x + delta).clamp(0, 1))
        loss = F.cross_entropy(adv_logits, y)
        self.train_adv_acc.update(adv_logits.detach(), y)
        self.train_loss.update(loss.detach(), weight=len(y))
        self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """pgd and trades: Lightning's step. free: ``replays`` steps on the same minibatch.

        Free adversarial training (Shafahi et al. 2019) replays each minibatch m times; each
        replay is one forward and one backward pass at x + delta, whose gradients give both the
        weight update and the perturbation's (delta += eps * sign(grad_x), clipped to eps, kept
        across minibatches and reset to zero when the batch shape changes). Here Lightning's
        automatic optimization stays on and this hook calls ``optimizer.step(closure)`` m times:
        each call runs Lightning's closure (``training_step``, ``zero_grad``, ``backward``), then
        Lightning's gradient clipping (``trainer.gradient_clip_val``), AMP loss scaling and the
        optimizer step; :meth:`on_after_backward` updates delta from the same backward pass.
        Manual optimization (``automatic_optimization = False``) would leave clipping and AMP
        scaling to the module, and Lightning refuses ``trainer.gradient_clip_val`` with it, so
        a config's clipping would stop the run. The learning-rate schedulers step as configured
        (per epoch: unchanged); ``trainer.global_step`` and what is counted in steps
        (``max_steps``, periodic checkpoints, ``log_every_n_steps``) count minibatches, m
        optimizer steps each; a stop (SIGTERM) never falls between two replays. train/adv_acc
        and train/loss are over every replay; train/acc is the clean accuracy of one extra
        forward pass per minibatch (no gradient, eval mode). delta is not saved in checkpoints:
        a resumed run starts it at zero again. Gradient accumulation is refused (Lightning then
        calls this hook only once per accumulated group).
        """
        if not (self.adv.enabled and self.adv.method == "free"):
            optimizer.step(closure=optimizer_closure)
            return
        try:
            for replay in range(self.adv.replays):
                self._replay = replay
                optimizer.step(closure=optimizer_closure)
        finally:
            self._replay = 0

    def on_after_backward(self) -> None:
        """Free training: delta += eps * sign(grad of the loss at x + delta), clipped to eps."""
        delta = self._free_delta
        if delta is None or delta.grad is None:
            return
        with torch.no_grad():  # (an AMP overflow gives inf/nan gradients: sign 0 for nan)
            step = self.adv.eps * torch.nan_to_num(delta.grad, nan=0.0).sign()
            self._free_delta = (delta + step).clamp(-self.adv.eps, self.adv.eps)

    def on_fit_start(self) -> None:
        if (
            self.adv.enabled
            and self.adv.method == "free"
            and self.trainer.accumulate_grad_batches > 1
        ):
            raise ConfigError(
                "adv_train.method=free replays each minibatch: it needs "
                f"trainer.accumulate_grad_batches=1, got {self.trainer.accumulate_grad_batches}"
            )

    def on_train_epoch_end(self) -> None:
        # Logged once an epoch, not every step: each log of a metric object moves all its state
        # to the device again, the largest per-step cost Lightning added to a training step.
        # gamma of the epoch: logged at its end, which a run resumed mid-epoch reaches too (the
        # learning rate is LearningRateMonitor's, in conf/callbacks/default.yaml)
        layers = ratio_layers(self.net)
        if layers:
            self.log("gamma", next(iter(layers.values())).gamma)
        self.log("train/loss_epoch", self.train_loss)
        self.log("train/acc", self.train_acc, prog_bar=True)
        if self.adv.enabled:
            self.log("train/adv_acc", self.train_adv_acc)

    def adversarial_examples(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L-inf PGD (foolbox) around ``x`` against the true or the predicted label.

        The attack runs in eval mode, so its forward passes leave BatchNorm statistics alone.
        """
        was_training = self.net.training
        self.net.eval()
        try:
            if self.adv.target == "predicted":
                with torch.no_grad():
                    y = self(x).argmax(dim=1)
            attack = fb.attacks.LinfPGD(
                abs_stepsize=self.adv.step_size,
                steps=self.adv.steps,
                random_start=self.adv.random_start,
            )
            # device: foolbox moves the network to cuda:0 otherwise (a CPU run, DDP rank > 0)
            fmodel = fb.PyTorchModel(self.net, bounds=(0, 1), device=x.device)
            _, x_adv, _ = attack(fmodel, x, y, epsilons=self.adv.eps)
        finally:
            self.net.train(was_training)
        return x_adv.detach()

    def trades_examples(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """TRADES' x': ``steps`` sign steps of ``step_size`` maximising KL(f(x) || f(x')) from
        x + 0.001 * N(0, 1), projected onto the eps ball and [0, 1] (:class:`_TradesPGD`).

        In eval mode, as :meth:`adversarial_examples`; ``y`` only feeds foolbox's criterion
        (TRADES' attack uses no labels).
        """
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                clean_probs = F.softmax(self(x), dim=1)
            attack = _TradesPGD(clean_probs, self.adv.step_size, self.adv.steps)
            fmodel = fb.PyTorchModel(self.net, bounds=(0, 1), device=x.device)
            x_adv = attack.run(fmodel, x, y, epsilon=self.adv.eps)
        finally:
            self.net.train(was_training)
        return x_adv.detach()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        if batch_idx == 0:
            logits, fractions = self.forward_with_active_fractions(x)
            self.log_dict(fractions)
        else:
            logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc.update(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def swap_to(self, activation: str, gamma: float) -> None:
        """Swap every ReLU of the live network for ``activation`` (in-run ReLU-to-k-WTA switch)."""
        example = torch.rand(
            1, self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size
        ).to(self.device)
        self.net, report = swap_activations(
            self.net,
            partial(make_activation, activation, gamma),
            example,
            self.hparams.backbone,
            swap_targets(self.hparams.swap, self.hparams.backbone),
        )
        self.hparams.activation, self.hparams.gamma = activation, check_gamma(gamma)
        log.info(
            "swapped %d ReLU sites for %s(gamma=%s)", report.sites, activation, self.hparams.gamma
        )

    def set_gamma(self, gamma: float) -> int:
        """Set gamma of every k-WTA layer; return how many there are (0: nothing changed)."""
        changed = set_gamma(self.net, gamma)
        if changed:
            self.hparams.gamma = check_gamma(gamma)
        return changed

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the running metric states beside the weights (not in them: old checkpoints and
        ``init_from`` compare state dicts key by key)."""
        checkpoint["metric_states"] = {n: _metric_state(getattr(self, n)) for n in RESUMED_METRICS}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the network when the checkpoint holds another activation, gamma or backbone
        options than this one.

        Loading happens before the state dict is copied in, so the weights land in a network like
        the one they were trained in (e.g. testing or resuming a run whose activation changed).
        The metric states are put back when training starts (Lightning resets them before).
        """
        self._metric_states_to_load = checkpoint.get("metric_states")
        saved = checkpoint.get("hyper_parameters", {})
        changed = {
            key: saved[key]
            for key in ("activation", "gamma", "backbone_options", "activation_options", "swap")
            if key in saved and saved[key] != self.hparams[key]
        }
        if not changed:
            return
        self.hparams.update(changed)
        hp = self.hparams
        self.net = build_network(
            hp.backbone,
            hp.num_classes,
            hp.in_channels,
            hp.image_size,
            hp.mean,
            hp.std,
            hp.activation,
            hp.gamma,
            hp.small_input,
            pretrained=False,  # the checkpoint's weights replace them
            backbone_options=hp.get("backbone_options"),
            activation_options=hp.get("activation_options"),
            swap=hp.swap,
        ).to(self.device)
        if hp.compile:
            self.net.compile()

    def forward_with_active_fractions(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The logits on ``x``, and each k-WTA layer's measured fraction of nonzero outputs.

        Measured on this forward pass, so logging them costs no extra one; ``active/mean`` is
        the mean over layers.
        """
        outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        hooks = [
            layer.register_forward_hook(
                lambda _m, _i, out, name=name: outputs[name].append((out != 0).float().mean())
            )
            for name, layer in kwta_layers(self.net[-1]).items()  # net[0] is the normalisation
        ]
        try:
            logits = self(x)
        finally:
            for hook in hooks:
                hook.remove()
        fractions = {f"active/{n}": torch.stack(v).mean().item() for n, v in outputs.items()}
        if fractions:
            fractions["active/mean"] = sum(fractions.values()) / len(fractions)
        return logits, fractions

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer or DEFAULT_OPTIMIZER)(self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


def _metric_state(metric: Metric) -> dict[str, Any]:
    # torchmetrics has no public way to save the update count; compute() warns without it.
    return {"state": dict(metric.metric_state), "updates": metric._update_count}


def _set_metric_state(metric: Metric, saved: Mapping[str, Any]) -> None:
    for name, value in saved["state"].items():
        setattr(metric, name, value.to(metric.device) if torch.is_tensor(value) else value)
    metric._update_count = saved["updates"]
