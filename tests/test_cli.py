"""train.py as a user runs it: bad input fails with one clear line; real MNIST trains."""

import json

import pytest
import torch

from kwta_lightning.data import ImageDataModule
from kwta_lightning.module import KWTAClassifier
from tests.helpers import needs_mnist, run_cli

QUICK = ["data=fake", "debug=fdr", "logger=csv"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["gamma=0"], "gamma must lie in (0, 1], got 0"),
        (["gamma=1.5"], "gamma must lie in (0, 1], got 1.5"),
        (["model=classifier", "model.backbone=resnet19"], "unknown model 'resnet19'"),
        (["act.name=gelu"], "unknown activation 'gelu'"),
        (["ckpt_path=missing.ckpt"], "ckpt_path missing.ckpt does not exist"),
        (["data.on_device=maybe"], "data.on_device must be true or false, got 'maybe'"),
    ],
)
def test_bad_config_values_fail_with_one_line(tmp_path, overrides, message):
    result = run_cli(*QUICK, *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in result.stderr


def test_missing_data_folder_names_folder_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_cli(
        "data=mnist",
        f"data.root={missing}",
        "data.download=false",
        *QUICK[1:],
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: mnist not found in {missing}")
    assert "MNIST/raw/" in last and "Traceback" not in result.stderr


def test_unknown_config_option_is_refused_by_hydra(tmp_path):
    result = run_cli("model=resnet19", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'model/resnet19'" in result.stderr


@pytest.mark.slow
@needs_mnist
def test_real_mnist_run_learns_and_its_checkpoint_rebuilds_the_model(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "model=cnn",
        "act=kwta",
        "gamma=0.1",
        "data=mnist",
        "trainer.max_epochs=2",
        "data.train_subset=10000",
        "data.num_workers=0",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_acc"] >= 0.95, metrics
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B ran offline into the run folder"

    # best.ckpt alone rebuilds the model, which scores the same on the MNIST test set.
    model = KWTAClassifier.load_from_checkpoint(metrics["ckpt_best"], map_location="cpu").eval()
    data = ImageDataModule.load_from_checkpoint(metrics["ckpt_best"], num_workers=0)
    data.setup()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in data.test_dataloader())
    assert correct / len(data.test_set) == pytest.approx(metrics["test_acc"], abs=1e-6)
