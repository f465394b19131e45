"""Sparsity annealing, warm starts, the in-run ReLU-to-k-WTA switch, adversarial training."""

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from kwta_lightning.core.activations import KWTA, kwta_layers
from kwta_lightning.core.callbacks import ReluToKWTA, WarmStart, load_weights, reestimate_batchnorm
from kwta_lightning.core.gamma_schedules import LinearGamma, MilestoneGamma, PaperGamma, StepGamma
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.training import train
from tests.helpers import compose_train, run_cli

TINY = ["data=fake", "data.image_size=16", "data.batch_size=16", "trainer=cpu", "logger=csv"]
ANNEAL = "callbacks=[default,sparsity_annealing]"


def per_epoch(run_dir: Path, key: str) -> dict[int, float]:
    """The value of a logged metric per epoch, from the run's CSV log."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["epoch"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def gamma_of(ckpt: Path) -> set[float]:
    model = KWTAClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    return {layer.gamma for layer in kwta_layers(model).values()}


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (LinearGamma(0.2, 0.1, epochs=2), [0.2, 0.15, 0.1, 0.1]),
        (StepGamma(0.2, 0.1, epochs=4, steps=2), [0.2, 0.2, 0.15, 0.15, 0.1, 0.1]),
        (MilestoneGamma([[0, 0.3], [2, 0.2], [3, 0.1]]), [0.3, 0.3, 0.2, 0.1, 0.1]),
        (
            PaperGamma(0.2, delta=0.005, every_n_epochs=2, floor=0.19),
            [0.2, 0.2, 0.195, 0.195, 0.19, 0.19],
        ),
    ],
)
def test_schedules(schedule, expected):
    assert [schedule(e) for e in range(len(expected))] == pytest.approx(expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LinearGamma(0.2, 1.5, epochs=2),
        lambda: StepGamma(0.2, 0.1, epochs=0),
        lambda: MilestoneGamma([[1, 0.2]]),
        lambda: MilestoneGamma([[0, 0.2], [3, 0.1], [2, 0.05]]),
        lambda: PaperGamma(0.2, delta=-0.005, every_n_epochs=2, floor=0.1),
    ],
)
def test_bad_schedules_are_refused(make):
    with pytest.raises(ConfigError):
        make()


@pytest.mark.slow
def test_annealing_sets_real_layers_per_epoch_and_resumes_mid_schedule(tmp_path):
    # Milestones 0.3 -> 0.2 (epoch 1) -> 0.1 (epoch 3); train 2 epochs, then resume to 4.
    schedule = [
        ANNEAL,
        "callbacks.sparsity_annealing.schedule.epochs=3",
        "callbacks.sparsity_annealing.schedule.gamma_start=0.3",
        f"callbacks.sparsity_annealing.checkpoint_dir={tmp_path / 'a' / 'checkpoints'}",
    ]
    first = compose_train(tmp_path / "a", [*TINY, "model=cnn", "debug=limit", *schedule])
    train(first)
    # Linear 0.3 -> 0.1 over 3 epochs: 0.3, 0.2333, 0.1667, 0.1.
    assert per_epoch(tmp_path / "a", "gamma") == pytest.approx({0: 0.3, 1: 0.233333})
    # The measured fraction of active units on a validation batch follows gamma: the real layers.
    assert per_epoch(tmp_path / "a", "active/mean") == pytest.approx({0: 0.3, 1: 0.2333}, abs=0.01)
    ckpts = tmp_path / "a" / "checkpoints"
    assert gamma_of(ckpts / "gamma=0.300.ckpt") == {0.3}
    assert gamma_of(ckpts / "gamma=0.233.ckpt") == {0.233333}
    assert (
        torch.load(ckpts / "last.ckpt", weights_only=True)["hyper_parameters"]["gamma"] == 0.233333
    )

    resumed = compose_train(
        tmp_path / "b",
        [
            *TINY,
            "model=cnn",
            "debug=limit",
            "trainer.max_epochs=4",
            f"ckpt_path={ckpts / 'last.ckpt'}",
            *schedule[:-1],
        ],
    )
    metrics = train(resumed)
    assert per_epoch(tmp_path / "b", "gamma") == pytest.approx({2: 0.166667, 3: 0.1})
    assert per_epoch(tmp_path / "b", "active/mean") == pytest.approx({2: 0.1667, 3: 0.1}, abs=0.01)
    # best.ckpt is the best epoch at the final gamma; the test ran that network.
    assert gamma_of(tmp_path / "b" / "checkpoints" / "best.ckpt") == {0.1}
    assert metrics["epochs"] == 4


@pytest.fixture(scope="module")
def relu_checkpoint(tmp_path_factory) -> Path:
    """A real ReLU CNN checkpoint (fake data, a few batches)."""
    out = tmp_path_factory.mktemp("relu")
    train(compose_train(out, [*TINY, "model=cnn", "act=relu", "debug=limit"]))
    return out / "checkpoints" / "last.ckpt"


def test_init_from_loads_relu_weights_into_kwta_model(tmp_path, relu_checkpoint):
    cfg = compose_train(tmp_path, [*TINY, "model=cnn", "act=kwta", f"init_from={relu_checkpoint}"])
    model = instantiate(cfg.model)
    assert kwta_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    warm_start = instantiate(cfg.callbacks.warm_start)
    warm_start.setup(SimpleNamespace(ckpt_path=None), model, "fit")
    saved = torch.load(relu_checkpoint, weights_only=True)["state_dict"]
    assert saved.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert not all(torch.equal(before[k], saved[k]) for k in saved)  # it did change the weights
    assert model.hparams.activation == "kwta"


def test_init_from_other_model_is_refused(relu_checkpoint):
    model = KWTAClassifier("resnet18", 10, 3, 16)
    with pytest.raises(ConfigError, match="does not fit this model: missing"):
        WarmStart(str(relu_checkpoint)).setup(SimpleNamespace(ckpt_path=None), model, "fit")


def test_init_from_mismatch_fails_with_one_line(tmp_path, relu_checkpoint):
    result = run_cli(
        "data=fake",
        "data.num_classes=5",
        "model=cnn",
        "debug=fdr",
        f"init_from={relu_checkpoint}",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: init_from {relu_checkpoint} (backbone=cnn, num_classes=10")
    assert "does not fit this model: net.1.fc2.weight has shape (10, 128)" in last
    assert "Traceback" not in result.stderr


def test_init_from_missing_or_corrupt_file_is_refused(tmp_path):
    model = KWTAClassifier("cnn", 10, 1, 16, [0.5], [0.3])
    with pytest.raises(ConfigError, match="init_from missing.ckpt does not exist"):
        load_weights(model, "missing.ckpt")
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable Lightning checkpoint"):
        load_weights(model, str(tmp_path / "bad.ckpt"))


@pytest.mark.slow
def test_relu_to_kwta_switch_leaves_no_relu_and_trains_on(tmp_path):
    cfg = compose_train(
        tmp_path,
        [
            *TINY,
            "model=cnn",
            "debug=limit",
            "trainer.max_epochs=3",
            "callbacks=[default,relu_to_kwta]",
            "callbacks.relu_to_kwta.relu_epochs=1",
            "callbacks.relu_to_kwta.bn_batches=2",
        ],
    )
    assert cfg.model.activation == "relu" and cfg.act.name == "kwta"
    metrics = train(cfg)
    assert metrics["epochs"] == 3
    run = tmp_path
    assert set(per_epoch(run, "train/loss_epoch")) == {0, 1, 2}
    assert per_epoch(run, "gamma").keys() == {1, 2}  # k-WTA from epoch 1 on
    assert per_epoch(run, "active/mean") == pytest.approx({1: 0.1, 2: 0.1}, abs=0.01)
    with open(run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("switch/val_acc_after")]
    assert len(rows) == 1 and 0 <= float(rows[0]["switch/val_acc_before"]) <= 1
    # The checkpoints record the swap: loading rebuilds a k-WTA network with no ReLU left.
    for name in ("last.ckpt", "best.ckpt"):
        model = KWTAClassifier.load_from_checkpoint(run / "checkpoints" / name)
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())
        assert len(kwta_layers(model)) == 3 and model.hparams.activation == "kwta"


def test_relu_to_kwta_refuses_a_model_that_is_not_relu():
    model = KWTAClassifier("cnn", 10, 1, 16, [0.5], [0.3], "kwta")
    with pytest.raises(ConfigError, match="needs a model that starts with ReLU"):
        ReluToKWTA(relu_epochs=1).setup(SimpleNamespace(ckpt_path=None), model, "fit")


def test_reestimate_batchnorm_averages_the_batches():
    net = nn.Sequential(nn.BatchNorm1d(3))
    batches = [(torch.randn(8, 3) * 2 + 5, None) for _ in range(3)]
    seen = reestimate_batchnorm(_Wrapped(net), batches, batches=2)
    assert seen == 2
    expected = torch.stack([x.mean(0) for x, _ in batches[:2]]).mean(0)
    assert torch.allclose(net[0].running_mean, expected, atol=1e-5)
    assert net[0].momentum == 0.1 and not net.training  # momentum and eval mode restored


class _Wrapped(nn.Module):
    """Wraps a network as the callbacks see a LightningModule: modules, device, train()."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.eval()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("activation", ["relu", "kwta"])
def test_adversarial_examples_stay_within_eps_and_pixel_range(activation):
    torch.manual_seed(0)
    adv = {"enabled": True, "eps": 0.1, "step_size": 0.03, "steps": 5}
    model = KWTAClassifier("cnn", 10, 1, 16, [0.5], [0.3], activation, adv_train=adv).train()
    x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    x_adv = model.adversarial_examples(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.05 and model.training  # it moved; the mode is restored
    model.eval()
    loss = torch.nn.functional.cross_entropy
    assert loss(model(x_adv), y) > loss(model(x), y)


def test_adversarial_training_runs_and_logs_adversarial_accuracy(tmp_path):
    overrides = ["adv_train.enabled=true", "adv_train.steps=2", "adv_train.target=predicted"]
    cfg = compose_train(
        tmp_path,
        [*TINY, "model=cnn", "debug=limit", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
        + overrides,
    )
    train(cfg)
    assert 0 <= per_epoch(tmp_path, "train/adv_acc")[0] <= 1


def test_bad_adversarial_option_is_refused():
    with pytest.raises(ConfigError, match="adv_train.target must be 'label' or 'predicted'"):
        KWTAClassifier("cnn", 10, 1, 16, [0.5], [0.3], adv_train={"target": "other"})
    with pytest.raises(ConfigError, match="adv_train: .*unexpected keyword argument 'epsilon'"):
        KWTAClassifier("cnn", 10, 1, 16, [0.5], [0.3], adv_train={"epsilon": 0.1})


def test_set_gamma_updates_layers_and_hyper_parameters():
    model = KWTAClassifier("cnn", 10, 1, 16, [0.5], [0.3], "kwta", 0.2)
    assert model.set_gamma(0.05) == 3 and model.hparams.gamma == 0.05
    assert {m.gamma for m in model.modules() if isinstance(m, KWTA)} == {0.05}
