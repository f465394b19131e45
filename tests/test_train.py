"""Training from composed configs: fast_dev_run, outputs, checkpoint round trip, resume."""

import json

import pytest
import torch

from kwta_lightning.core.activations import KWTA
from kwta_lightning.core.data import ImageDataModule
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.run.training import train
from tests.helpers import compose_train

TINY = ["data=fake", "data.image_size=16", "data.batch_size=16", "trainer=cpu", "logger=csv"]


@pytest.mark.parametrize(
    ("model", "choice", "act", "gamma"),
    [
        ("cnn", ["act=relu"], "relu", None),
        ("cnn", ["act=kwta"], "kwta", 0.1),
        ("resnet18", ["act=kwta"], "kwta", 0.1),
        ("resnet18", ["act=kwta", "act.per_channel=true"], "kwta_channel", 0.1),
        ("cnn", ["act=kwta_fixed", "act.options.k=8"], "kwta_fixed(k=8)", None),
        ("paper_mnist_cnn", ["act=kwta_fixed", "act.options.k=8"], "kwta_fixed(k=8)", None),
    ],
)
def test_fast_dev_run(tmp_path, model, choice, act, gamma):
    options = ["model.backbone_options.hidden=64"] if model == "paper_mnist_cnn" else []
    cfg = compose_train(tmp_path, [*TINY, f"model={model}", *choice, *options, "debug=fdr"])
    metrics = train(cfg)
    assert 0 <= metrics["test_acc"] <= 1
    assert (metrics["model"], metrics["act"], metrics["gamma"]) == (model, act, gamma)
    assert json.loads((tmp_path / "metrics.json").read_text())["test_acc"] == metrics["test_acc"]


def test_outputs_checkpoints_and_round_trip(tmp_path):
    cfg = compose_train(
        tmp_path, [*TINY, "model=cnn", "act=kwta", "gamma=0.2", "debug=limit", "optimizer.lr=0.05"]
    )
    metrics = train(cfg)

    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "best.ckpt").is_file() and (ckpts / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    expected_keys = {"test_acc", "val_acc_best", "epochs", "model", "act", "gamma", "data"}
    expected_keys |= {"ckpt_best", "ckpt_last", "wall_time_s"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert expected_keys <= saved.keys()
    assert saved["epochs"] == 2 and saved["gamma"] == 0.2 and saved["data"] == "fake"
    assert saved["ckpt_best"] == str(ckpts / "best.ckpt")

    # best.ckpt alone rebuilds the model: same network, same test accuracy on the same batches.
    model = KWTAClassifier.load_from_checkpoint(ckpts / "best.ckpt", map_location="cpu").eval()
    assert [m.gamma for m in model.modules() if isinstance(m, KWTA)] == [0.2, 0.2, 0.2]
    data = ImageDataModule.load_from_checkpoint(ckpts / "best.ckpt")
    data.setup()
    batches = list(data.test_dataloader())[:2]  # debug=limit tests two batches
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
    total = sum(len(y) for _, y in batches)
    assert correct / total == pytest.approx(metrics["test_acc"], abs=1e-6)


def test_resume_from_last_checkpoint(tmp_path):
    first = compose_train(tmp_path / "a", [*TINY, "model=cnn", "debug=limit"])
    train(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = compose_train(
        tmp_path / "b",
        [*TINY, "model=cnn", "debug=limit", "trainer.max_epochs=3", f"ckpt_path={last}"],
    )
    metrics = train(resumed)
    assert metrics["epochs"] == 3
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


def test_kwta_layers_log_gamma_and_active_fraction(tmp_path):
    cfg = compose_train(tmp_path, [*TINY, "model=cnn", "act=kwta", "gamma=0.3", "debug=limit"])
    train(cfg)
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"gamma", "lr-SGD", "active/mean", "active/act1", "train/acc", "val/acc"} <= set(header)


def test_last_checkpoint_is_written_every_epoch_even_without_a_new_best(tmp_path):
    # Monitoring the epoch number with mode=min keeps best.ckpt at epoch 0.
    overrides = [*TINY, "model=cnn", "debug=limit", "trainer.max_epochs=3"]
    overrides += ["callbacks.model_checkpoint.monitor=epoch", "callbacks.model_checkpoint.mode=min"]
    metrics = train(compose_train(tmp_path, overrides))
    ckpts = tmp_path / "checkpoints"
    assert torch.load(ckpts / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 2
    assert metrics["ckpt_last"] == str(ckpts / "last.ckpt")


@pytest.mark.parametrize(
    ("data", "eps", "steps"), [("cifar10", 0.031, 10), ("svhn", 0.047, 10), ("mnist", 0.3, 40)]
)
def test_adversarial_training_defaults_follow_the_data_set(tmp_path, data, eps, steps):
    adv = compose_train(tmp_path, [f"data={data}"]).model.adv_train
    assert (adv.eps, adv.steps) == (eps, steps)
