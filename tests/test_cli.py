"""train.py as a user runs it: bad input fails with one clear line; real MNIST trains."""

import json
import re
import subprocess
import sys
import time

import pytest
import torch

from kwta_lightning.core.data import ImageDataModule
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.run.validation import PRECISIONS
from tests.helpers import ROOT, cli_env, needs_mnist, run_cli

QUICK = ["data=fake", "debug=fdr", "logger=csv"]


# Names and values a user could type wrong, each refused before any work starts, with one line
# that names the key (and the value and what is allowed, or the known names)
BAD_VALUES = [
    ("train.py", "gamma=0", "gamma=0: must be a number > 0 and <= 1"),
    ("train.py", "gamma=1.5", "gamma=1.5: must be a number > 0 and <= 1"),
    ("train.py", "optimizer.lr=-0.1", "optimizer.lr=-0.1: must be a number > 0"),
    ("train.py", "optimizer.lr=fast", "optimizer.lr=fast: must be a number > 0"),
    ("train.py", "optimizer.momentum=1.5", "optimizer.momentum=1.5: must be a number >= 0 and"),
    ("train.py", "optimizer.weight_decay=-1", "optimizer.weight_decay=-1: must be a number >= 0"),
    ("train.py", "trainer.max_epochs=ten", "trainer.max_epochs=ten: must be an integer >= 1"),
    ("train.py", "trainer.max_epochs=-5", "trainer.max_epochs=-5: must be an integer >= 1"),
    ("train.py", "trainer.precision=17", "trainer.precision=17: must be one of 64-true, 32-true"),
    ("train.py", "data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("train.py", "data.train_subset=0", "data.train_subset=0: must be null or an integer >= 1"),
    ("train.py", "data.train_subset=-5", "data.train_subset=-5: must be null or an integer"),
    ("train.py", "data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
    ("train.py", "data.on_device=maybe", "data.on_device=maybe: must be true or false"),
    ("train.py", "seed=abc", "seed=abc: must be an integer"),
    ("train.py", "adv_train.enabled=maybe", "adv_train.enabled=maybe: must be true or false"),
    ("train.py", "adv_train.eps=-0.1", "adv_train.eps=-0.1: must be a number >= 0"),
    ("train.py", "model.pretrained=maybe", "model.pretrained=maybe: must be true or false"),
    ("train.py", "resume=perhaps", "resume=perhaps: must be true or false"),
    ("train.py", "callbacks.periodic_checkpoint.minutes=0", "callbacks.periodic_checkpoint."),
    ("train.py", "model.backbone=resnet19", "unknown model 'resnet19'"),
    ("train.py", "act.name=gelu", "unknown activation 'gelu'"),
    ("train.py", "ckpt_path=missing.ckpt", "ckpt_path missing.ckpt does not exist"),
    ("train.py", "experiment=paper_incremental", "init_from is required"),
    ("train.py", "act=kwta_fixed", "act.options.k is required: give it on the command line"),
    ("train.py", "gama=0.1", "gama is not a key of the config (did you mean gamma?)"),
    ("train.py", "trainer.max_epoch=1", "trainer.max_epoch is not a key of the config (did you"),
    ("train.py", "adv_train.epss=0.1", "adv_train.epss is not a key of the config (did you mean"),
    ("train.py", "trainer.limit_train_batches=2", "trainer.limit_train_batches is not a key of"),
    ("train.py", "model=resnet19", "unknown model resnet19; known: alexnet, classifier, cnn"),
    ("train.py", "act=gelu", "unknown act gelu; known: kwinners, kwta, kwta_fixed, relu"),
    ("train.py", "act.impl=fast", "act.impl=fast: must be one of kernel, torch, topk"),
    ("train.py", "act.per_channel=maybe", "act.per_channel=maybe: must be true or false"),
    ("train.py", "logger=foo", "unknown logger foo; known: csv, many_loggers, none"),
    ("train.py", "hydra/launcher=foo", "unknown hydra/launcher foo; known: basic, joblib, slurm"),
    ("train.py", "data=imagenet", "unknown data imagenet; known: cifar10, cifar100, fake"),
    ("train.py", "optimizer=adamw", "unknown optimizer adamw; known: adam, sgd"),
    ("attack.py", "preset=mnist", "unknown preset mnist; known: mnist_kwta"),
    ("attack.py", "attack.pgd.stepz=3", "attack.pgd.stepz is not a key of the config (did you"),
    (
        "kwta-toy1d",
        "widht=3",
        "widht is not a key of the config (did you mean width?)",
    ),
    ("attack.py", "batch_size=0", "batch_size=0: must be an integer >= 1"),
    ("attack.py", "n_samples=0", "n_samples=0: must be an integer >= 1"),
    ("attack.py", "eps=[0.1,-0.2]", "eps=[0.1, -0.2]: must be a number >= 0, a list of them"),
    ("attack.py", "attack.pgd.steps=-1", "attack.pgd.steps=-1: must be an integer >= 1"),
    ("attack.py", "attack.square.n_queries=0", "attack.square.n_queries=0: must be an integer"),
    ("attack.py", "attack.nes_pgd.sigma=0", "attack.nes_pgd.sigma=0: must be a number > 0"),
    ("attack.py", "diagnostics.tolerance=2", "diagnostics.tolerance=2: must be a number >= 0"),
    ("attack.py", "attack=[pgd,pgdd]", "unknown attack pgdd; known: apgd_ce"),
    ("kwta-toy1d", "steps=-1", "steps=-1: must be an integer >= 1"),
    ("kwta-landscape", "n_inputs=0", "n_inputs=0: must be an integer >= 1"),
]


@pytest.mark.parametrize(("script", "override", "message"), BAD_VALUES)
def test_a_bad_value_fails_at_once_with_one_line(tmp_path, script, override, message):
    common = {"train.py": QUICK, "attack.py": ["ckpt_path=missing.ckpt"]}.get(script, [])
    result = run_cli(*common, override, f"hydra.run.dir={tmp_path}", script=script)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_an_override_hydra_cannot_read_or_a_run_folder_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").touch()
    cases = {
        f"init_from={tmp_path}/gamma=0.150.ckpt": "a value with '=' in it needs quotes",
        f"hydra.run.dir={tmp_path}/afile/run": f"{tmp_path}/afile is a file, not a folder",
    }
    for override, message in cases.items():
        result = run_cli(*QUICK, override)
        assert result.returncode == 2
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {override}: ") and message in line, line


def test_the_precisions_allowed_are_lightnings():
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT

    def literals(hint):
        args = get_args(hint)
        return {leaf for arg in args for leaf in literals(arg)} if args else {hint}

    assert set(PRECISIONS) == literals(_PRECISION_INPUT)


def test_a_failed_runs_folder_says_so_in_its_log_and_error_file(tmp_path):
    result = run_cli(*QUICK, "seed=abc", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "error: seed=abc" not in result.stdout  # once on screen
    assert "error: seed=abc: must be an integer" in (tmp_path / "train.log").read_text()
    assert (tmp_path / "error.txt").read_text().startswith("error: seed=abc: must be an integer")
    again = run_cli(*QUICK, "model=cnn", f"hydra.run.dir={tmp_path}", "resume=false")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (tmp_path / "error.txt").exists()  # the folder no longer says it failed


def test_a_trainer_argument_it_does_not_take_is_one_line_and_its_traceback_is_kept(tmp_path):
    result = run_cli(*QUICK, "+trainer.foo=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: InstantiationException: Error in call to target 'lightning")
    assert "unexpected keyword argument 'foo'" in line
    assert "Traceback" in (tmp_path / "error.txt").read_text()


def test_with_stdout_in_a_file_each_epoch_shows_while_the_run_goes_on(tmp_path):
    stdout = tmp_path / "stdout.txt"
    args = ["data=fake", "model=cnn", "data.image_size=16", "data.batch_size=8", "logger=csv"]
    args += ["data.train_subset=64", "data.val_size=16", "trainer.max_epochs=6"]
    args += ["callbacks.log_progress.every_n_steps=4", f"hydra.run.dir={tmp_path / 'run'}"]
    with stdout.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args], stdout=out, stderr=out, env=cli_env()
        )
        deadline = time.monotonic() + 300
        while "epoch 1/6 done" not in stdout.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, stdout.read_text()[-3000:]
            time.sleep(0.2)
        running = process.poll() is None
        assert process.wait(timeout=300) == 0, stdout.read_text()[-3000:]
    assert running, "the first epoch's line came only at the end"
    text = stdout.read_text()
    assert "epoch 1/6 step 4/8: loss " in text and " images/s, epoch done in about " in text
    assert "epoch 1/6 step 8/8" not in text  # the epoch's own line says it
    assert re.search(r"epoch 6/6 done in \S+: train/loss [\d.]+, .*val/acc [\d.]+.*; done", text)
    log_file = (tmp_path / "run" / "train.log").read_text()
    assert "epoch 3/6 done" in log_file and 'metrics: {"test_acc": ' in log_file


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
