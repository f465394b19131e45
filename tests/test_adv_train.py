"""Adversarial training methods: TRADES and free adversarial training (PGD: test_callbacks.py)."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from kwta_lightning.core import module
from kwta_lightning.core.module import KWTAClassifier, trades_loss
from kwta_lightning.errors import ConfigError
from kwta_lightning.run import validation
from kwta_lightning.run.training import train
from kwta_lightning.run.validation import check_values
from tests.helpers import compose_train, run_cli
from tests.test_callbacks import TINY, per_epoch

CNN = ("cnn", 10, 1, 16, [0.5], [0.3])  # backbone, classes, channels, size, mean, std


@pytest.mark.parametrize(
    ("method", "extra"),
    [("trades", ["adv_train.steps=2"]), ("free", ["adv_train.replays=2"])],
)
def test_each_method_trains_through_the_config_and_logs_adversarial_accuracy(
    tmp_path, method, extra
):
    overrides = ["adv_train.enabled=true", f"adv_train.method={method}", *extra]
    limits = ["debug=limit", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    cfg = compose_train(tmp_path, [*TINY, "model=cnn", *limits, *overrides])
    train(cfg)
    for key in ("train/adv_acc", "train/acc"):
        assert 0 <= per_epoch(tmp_path, key)[0] <= 1
    assert per_epoch(tmp_path, "train/loss_epoch")[0] > 0


def test_trades_loss_is_ce_plus_beta_kl_on_a_case_computed_by_hand():
    # clean p = (1/2, 1/2), adversarial q = (3/4, 1/4), label 0:
    # CE = ln 2, KL(p || q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); beta 6: ln 2 + 3 ln(4/3)
    logits, adv_logits = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])
    loss = trades_loss(logits, adv_logits, torch.tensor([0]), beta=6.0)
    assert loss.item() == pytest.approx(math.log(2) + 3 * math.log(4 / 3), rel=1e-6)  # 1.556193


def test_the_trades_training_step_is_ce_plus_beta_kl_at_its_adversarial_examples(monkeypatch):
    torch.manual_seed(0)
    model = KWTAClassifier(*CNN, "relu", adv_train={"enabled": True, "method": "trades"}).train()
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)  # a fixed x'
    monkeypatch.setattr(model, "trades_examples", lambda *_: x_adv)
    with pytest.warns(UserWarning, match="self.log"):  # no trainer here
        loss = model.training_step((x, y), 0)
    with torch.no_grad():  # train mode, as the step: BatchNorm of each batch
        p, q = model(x).double().softmax(1), model(x_adv).double().softmax(1)
    ce = -p[range(4), y].log().mean()
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert loss.item() == pytest.approx((ce + 6.0 * kl).item(), rel=1e-5)


def test_trades_examples_stay_within_eps_raise_the_kl_and_run_in_eval_mode():
    torch.manual_seed(0)
    adv = {"enabled": True, "method": "trades", "eps": 0.1, "step_size": 0.03, "steps": 5}
    model = KWTAClassifier(*CNN, "relu", adv_train=adv).train()
    modes = []
    model.net.register_forward_pre_hook(lambda net, _: modes.append(net.training))
    x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    x_adv = model.trades_examples(x, y)
    assert modes and not any(modes) and model.training  # eval for the attack, then restored
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        p = model(x).softmax(1)
        noise = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)

        def kl(x2: torch.Tensor) -> float:
            return F.kl_div(model(x2).log_softmax(1), p, reduction="batchmean").item()

        assert kl(x_adv) > 10 * kl(noise)  # well past TRADES' starting point


class _Replays(Callback):
    """Per minibatch: the optimizer steps it made, and delta after it."""

    def __init__(self) -> None:
        self.steps, self.batches = 0, []

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_post_hook(self._count)

    def _count(self, *_) -> None:
        self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append((self.steps, pl_module._free_delta.clone()))
        self.steps = 0


class _Recording(KWTAClassifier):
    """Records the delta each replay trained at, and the gradient norm once clipped."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.used.append((self._replay, self._free_delta.detach().clone()))
        return loss

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.norms.append(torch.stack(norms).norm().item())


def test_free_training_steps_replays_times_per_batch_with_delta_within_eps(tmp_path):
    torch.manual_seed(0)
    eps, replays = 0.05, 3
    adv = {"enabled": True, "method": "free", "eps": eps, "replays": replays}
    scheduler = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True}
    model = _Recording(*CNN, "relu", adv_train=adv, scheduler=scheduler | {"step_size": 1})
    model.used, model.norms = [], []
    data = TensorDataset(torch.rand(20, 1, 16, 16), torch.randint(0, 10, (20,)))
    replay = _Replays()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=0.01,
        callbacks=[replay],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))  # batches of 8, 8, 4 per epoch
    assert [steps for steps, _ in replay.batches] == [replays] * 6
    assert trainer.global_step == 6  # minibatches, each `replays` optimizer steps
    assert [len(delta) for _, delta in replay.batches] == [8, 8, 4] * 2
    assert all(delta.abs().max() == pytest.approx(eps) for _, delta in replay.batches)
    assert [r for r, _ in model.used] == list(range(replays)) * 6
    firsts = [delta for _, delta in model.used[::replays]]  # each minibatch's first replay
    # carried over from the minibatch before; zero where the batch shape changed (8 -> 4 -> 8)
    assert torch.equal(firsts[1], replay.batches[0][1])
    assert torch.equal(firsts[4], replay.batches[3][1])
    assert [bool(d.any()) for d in firsts] == [False, True, False, False, True, False]
    assert len(model.norms) == 18 and max(model.norms) <= 0.01 * (1 + 1e-4)  # clipped, each step
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**2)  # StepLR


def test_free_training_refuses_gradient_accumulation(tmp_path):
    model = KWTAClassifier(*CNN, adv_train={"enabled": True, "method": "free", "replays": 2})
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, accumulate_grad_batches=2,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    data = TensorDataset(torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,)))
    with pytest.raises(ConfigError, match="needs trainer.accumulate_grad_batches=1, got 2"):
        trainer.fit(model, DataLoader(data, batch_size=4))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adv_train.method=fgsm", "adv_train.method=fgsm: must be one of pgd, trades, free"),
        ("adv_train.beta=0", "adv_train.beta=0: must be a number > 0"),
        ("adv_train.replays=0", "adv_train.replays=0: must be an integer >= 1"),
        ("adv_train.replays=2.5", "adv_train.replays=2.5: must be an integer >= 1"),
    ],
)
def test_a_bad_method_beta_or_replays_is_one_line_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        check_values(compose_train(tmp_path, [override]))
    assert str(err.value) == message


def test_a_bad_method_fails_at_the_door_with_one_line(tmp_path):
    result = run_cli("data=fake", "debug=fdr", "adv_train.method=fgsm", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == "error: adv_train.method=fgsm: must be one of pgd, trades, free"


def test_the_module_refuses_what_its_method_does_not_take():
    cases = {
        "adv_train.method must be one of pgd, trades, free, got 'fgsm'": {"method": "fgsm"},
        "adv_train.beta must be > 0, got -1": {"method": "trades", "beta": -1},
        "adv_train.replays must be an integer >= 1, got 0": {"replays": 0},
        "target and mix are method=pgd's": {"method": "trades", "target": "predicted"},
        "method=free takes target=label, mix=1.0": {"method": "free", "mix": 0.5},
    }
    for message, options in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            KWTAClassifier(*CNN, adv_train=options)


def test_the_door_knows_the_modules_methods():
    assert validation.ADV_TRAIN_METHODS == module.ADV_TRAIN_METHODS
