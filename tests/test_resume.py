"""Runs that survive: kill and resume, SIGTERM, changed configs, bad and crafted checkpoints."""

import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kwta_lightning.core import kwta_select
from kwta_lightning.run.checkpoints import CheckpointError, SafeCheckpointIO, newest_good_checkpoint
from kwta_lightning.run.loggers import AppendingTensorBoardLogger, wandb_logger
from kwta_lightning.run.resume import changed_keys, move_previous_run
from kwta_lightning.run.training import train
from tests.helpers import cli_env, compose_train, needs_mnist, run_cli, start_cli

# Real MNIST, 12 steps an epoch, 3 epochs, deterministic: a run takes seconds.
MNIST_RUN = [
    "data=mnist",
    "model=cnn",
    "logger=csv",
    "trainer=cpu",
    "trainer.deterministic=true",
    "trainer.max_epochs=3",
    "trainer.log_every_n_steps=4",
    "data.train_subset=600",
    "data.val_subset=200",
    "data.test_subset=500",
    "data.batch_size=50",
    "data.num_workers=0",
    "callbacks.periodic_checkpoint.steps=5",
]
TINY = ["data=fake", "data.image_size=16", "data.batch_size=16", "trainer=cpu", "logger=csv"]


def ckpt_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


STEPS_PER_EPOCH = 12


def signal_mid_epoch(
    run: Path, signum: int, min_step: int, run_on_s: float = 0.0, env: dict[str, str] | None = None
) -> int:
    """Start the MNIST run; once last.ckpt holds a step >= min_step, let it run ``run_on_s`` more,
    freeze it (SIGSTOP) and send ``signum`` if its newest checkpoint is mid-epoch (else let it go
    on to the next one). Freezing first makes "mid-epoch" a fact, not a race; the exit status."""
    err = run.parent / f"{run.name}.err"
    proc = start_cli(*MNIST_RUN, f"hydra.run.dir={run}", stderr_to=err, env=env)
    last = run / "checkpoints" / "last.ckpt"
    while proc.poll() is None:
        if last.is_file() and ckpt_step(last) >= min_step:
            time.sleep(run_on_s)
            proc.send_signal(signal.SIGSTOP)
            if ckpt_step(last) % STEPS_PER_EPOCH:
                proc.send_signal(signum)
                proc.send_signal(signal.SIGCONT)
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    return proc.wait(timeout=300)


def stop_step(run: Path, signame: str) -> tuple[str, int]:
    """The stop line the run printed last and the step it names, which last.ckpt must hold."""
    line = (run.parent / f"{run.name}.err").read_text().strip().splitlines()[-1]
    prefix = f"stopped by {signame} at step "
    assert line.startswith(prefix), line
    step = int(line.removeprefix(prefix).partition(";")[0])
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == step
    return line, step


def resume_is_the_same_run(run: Path, uninterrupted: Path, *extra: str, env=None) -> bool:
    """Start the run again in its folder; whether it ends as the uninterrupted run did."""
    resumed = run_cli(*MNIST_RUN, *extra, f"hydra.run.dir={run}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return outcome(run) == outcome(uninterrupted)


def outcome(run: Path) -> tuple[dict, str]:
    metrics = json.loads((run / "metrics.json").read_text())
    keys = ("test_acc", "test_loss", "val_acc_best", "epochs")
    return {k: metrics[k] for k in keys}, (run / "csv" / "metrics.csv").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli(*MNIST_RUN, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
@needs_mnist
def test_killed_mid_epoch_and_resumed_is_the_same_run(uninterrupted, tmp_path):
    run = tmp_path / "run"
    assert signal_mid_epoch(run, signal.SIGKILL, min_step=15, run_on_s=0.3) == -9
    assert not (run / "metrics.json").exists()
    assert ckpt_step(run / "checkpoints" / "last.ckpt") % STEPS_PER_EPOCH, "resumes mid-epoch"
    resumed = run_cli(*MNIST_RUN, f"hydra.run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    # Same numbers and the same CSV log, row for row (step rows included).
    assert outcome(run) == outcome(uninterrupted)


@pytest.mark.slow
@needs_mnist
def test_sigterm_saves_the_step_exits_non_zero_and_resumes_from_it(uninterrupted, tmp_path):
    run = tmp_path / "run"
    assert signal_mid_epoch(run, signal.SIGTERM, min_step=15, run_on_s=0.2) == 128 + 15
    stop_step(run, "SIGTERM")
    assert resume_is_the_same_run(run, uninterrupted)


@pytest.mark.slow
@needs_mnist
def test_on_slurm_the_requeue_signal_saves_the_step_requeues_and_the_job_resumes(
    uninterrupted, tmp_path
):
    # A SLURM job's environment, and an scontrol that notes what it is asked.
    bin_dir, asked = tmp_path / "bin", tmp_path / "scontrol.args"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {asked}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train"}
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    env = cli_env(PATH=f"{bin_dir}:{os.environ['PATH']}", **slurm)

    run = tmp_path / "run"
    assert signal_mid_epoch(run, signal.SIGUSR1, min_step=15, run_on_s=0.2, env=env) == 128 + 10
    line, _ = stop_step(run, "SIGUSR1")
    assert line.endswith("requeued SLURM job 4242; it resumes in the same folder"), line
    assert asked.read_text() == "requeue 4242\n"
    assert resume_is_the_same_run(run, uninterrupted, env=env)


@pytest.mark.slow
@needs_mnist
def test_sigint_during_validation_stops_at_the_epoch_end_and_resumes_the_same_run(
    uninterrupted, tmp_path
):
    # Saved mid-validation, Lightning's checkpoint would resume past the next epoch untrained.
    run, done = tmp_path / "run", tmp_path / "signalled"
    signal_in_validation = [
        "+callbacks.sig._target_=tests.helpers.SignalDuringValidation",
        f"+callbacks.sig.signum={int(signal.SIGINT)}",
        "+callbacks.sig.epoch=1",
        f"+callbacks.sig.done={done}",
    ]
    stopped = run_cli(*MNIST_RUN, *signal_in_validation, f"hydra.run.dir={run}")
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    last_line = stopped.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"stopped by SIGINT at step {2 * STEPS_PER_EPOCH};"), last_line
    assert resume_is_the_same_run(run, uninterrupted, *signal_in_validation)


@pytest.mark.slow
@needs_mnist
def test_a_finished_run_started_again_keeps_its_log_and_a_changed_config_is_refused(
    uninterrupted, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before = outcome(run)
    again = run_cli(*MNIST_RUN, f"hydra.run.dir={run}")
    assert again.returncode == 0 and "this run finished before" in again.stdout
    assert outcome(run) == before

    changed = run_cli(*MNIST_RUN, "gamma=0.2", "optimizer.lr=0.05", f"hydra.run.dir={run}")
    assert changed.returncode == 2
    line = changed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: run folder {run} holds a run with another config (")
    assert "gamma: 0.1 -> 0.2" in line and "optimizer.lr: 0.1 -> 0.05" in line
    assert "gamma=0.2" not in (run / ".hydra" / "overrides.yaml").read_text()  # labels kept
    assert outcome(run) == before


def test_resume_safe_keys_are_not_differences():
    saved = {"gamma": 0.1, "trainer": {"max_epochs": 3, "precision": "32"}, "logger": {"a": 1}}
    new = {"gamma": 0.2, "trainer": {"max_epochs": 9, "precision": "16"}, "logger": None}
    assert changed_keys(saved, new) == ["gamma", "trainer.precision"]


# --- checkpoints: bad, crafted, written atomically ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real (fake-data) run folder with best.ckpt and last.ckpt."""
    out = tmp_path_factory.mktemp("tiny")
    train(compose_train(out, [*TINY, "model=cnn", "debug=limit"]))
    return out


def test_a_corrupt_newest_checkpoint_falls_back_to_an_older_good_one(tiny_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", run / "checkpoints")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])  # truncated, and the newest
    with caplog.at_level(logging.WARNING):
        path, ckpt = newest_good_checkpoint(run)
    assert path == run / "checkpoints" / "best.ckpt" and "loops" in ckpt
    assert "last.ckpt is empty, truncated or not a PyTorch file" in caplog.text


def test_an_empty_last_checkpoint_and_no_other_fails_with_one_line(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no good checkpoint to resume from"):
        newest_good_checkpoint(tmp_path)
    result = run_cli(*TINY, "model=cnn", "debug=limit", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: no good checkpoint to resume from in {tmp_path}")
    assert "last.ckpt is empty, truncated or not a PyTorch file" in line


class _Payload:
    """Unpickled, it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose unpickling would create ``marker`` (train.py's keys, one payload)."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "crafted.ckpt"
    keys = ("state_dict", "loops", "optimizer_states", "callbacks", "hyper_parameters")
    torch.save({k: {} for k in keys} | {"epoch": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("load_path", ["ckpt_path", "auto-resume", "init_from"])
def test_a_crafted_checkpoint_never_runs_its_payload(crafted, tmp_path, load_path):
    path, marker = crafted
    run = tmp_path / "run"
    args = {"ckpt_path": [f"ckpt_path={path}"], "init_from": [f"init_from={path}"]}
    if load_path == "auto-resume":
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(path, run / "checkpoints" / "last.ckpt")
    result = run_cli(
        *TINY,
        "model=cnn",
        "debug=limit",
        *args.get(load_path, []),
        f"hydra.run.dir={run}",
        env=cli_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"),
    )
    assert not marker.exists(), "the payload ran"
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "weights_only=False" not in result.stderr
    assert "refused" in line or "not a readable Lightning checkpoint" in line, line


def test_the_trainers_loads_are_weights_only(crafted, monkeypatch):
    path, marker = crafted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="was refused: it holds objects other than tensors"):
        SafeCheckpointIO().load_checkpoint(path)  # fit(ckpt_path=...) and test(ckpt_path=...)
    assert not marker.exists()


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"step": 1}, path)

    def dies_mid_write(obj, f):
        f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        SafeCheckpointIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resume_false_moves_the_earlier_run_aside(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    moved = move_previous_run(run)
    assert moved.parent == run / "previous"
    assert {p.name for p in moved.iterdir()} == {"checkpoints", "csv", "metrics.json"}
    assert newest_good_checkpoint(run) is None


# --- the kernel's build folder ----------------------------------------------------------------


def test_kernel_build_folder_is_one_per_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # torch's default build root follows it
    monkeypatch.setattr(sys, "prefix", "/envs/a")
    first = kwta_select.build_directory()
    assert first.parent == tmp_path / "torch_extensions" and first.is_dir()
    assert kwta_select.build_directory() == first
    monkeypatch.setattr(sys, "prefix", "/envs/b")
    assert kwta_select.build_directory() != first
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert kwta_select.build_directory() is None  # the user's folder: torch's own layout in it


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    first = wandb_logger(save_dir=str(tmp_path), project="p", mode="disabled")
    again = wandb_logger(save_dir=str(tmp_path), project="p", mode="disabled")
    assert first._wandb_init["id"] == again._wandb_init["id"]
    assert again._wandb_init["resume"] == "allow"
    other = wandb_logger(save_dir=str(tmp_path / "other"), project="p", mode="disabled")
    assert other._wandb_init["id"] != first._wandb_init["id"]


def test_a_resumed_tensorboard_log_shows_each_step_once(tmp_path):
    killed = AppendingTensorBoardLogger(tmp_path, name="tensorboard", version="")
    for step in range(10):  # the checkpoint was at step 6; steps 6-9 are lost work
        killed.log_metrics({"train/loss": 10.0 - step}, step=step)
    killed.finalize("failed")
    resumed = AppendingTensorBoardLogger(tmp_path, name="tensorboard", version="")
    resumed.purge_from(6)
    for step in range(6, 8):
        resumed.log_metrics({"train/loss": -step}, step=step)
    resumed.finalize("success")

    events = EventAccumulator(killed.log_dir)
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert curve == [(s, 10.0 - s) for s in range(6)] + [(6, -6.0), (7, -7.0)]
