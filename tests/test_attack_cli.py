"""attack.py as a user runs it on a train.py checkpoint; unsafe or broken checkpoints refused."""

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from kwta_lightning.attacks.checkpoint import CheckpointError, load_checkpoint
from kwta_lightning.training import train
from tests.helpers import compose_train, run_cli

SCHEMA_RESULT = {"attack", "norm", "eps", "robust_acc", "success_rate", "params"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """best.ckpt of a short k-WTA CNN run on fake data."""
    out = tmp_path_factory.mktemp("train")
    overrides = ["data=fake", "data.image_size=16", "data.batch_size=16", "trainer=cpu"]
    train(compose_train(out, [*overrides, "logger=csv", "model=cnn", "act=kwta", "debug=limit"]))
    return out / "checkpoints" / "best.ckpt"


def run_attack_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, script="attack.py")


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_cli_writes_the_report_files_and_schema(checkpoint, tmp_path):
    result = run_attack_cli(
        f"ckpt_path={checkpoint}",
        "attack=[pgd,fgsm,square]",
        "attack.pgd.attack.steps=5",
        "attack.square.n_queries=20",
        "n_samples=24",
        "batch_size=16",
        "eps=[0,0.1]",
        "diagnostics.unbounded_steps=5",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("report.json", "report.md", "robust_accuracy.png", "examples.png"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B ran offline in the run folder"
    assert "worst_case" in result.stdout and "unbounded_eps" in result.stdout

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checkpoint"] == str(checkpoint)
    assert report["n_samples"] == 24 and report["data"] == "fake"
    assert report["epsilons"] == {"linf": [0.0, 0.1], "l2": [0.5]}
    rows = report["results"]
    assert [(r["attack"], r["eps"]) for r in rows] == [
        (a, e) for a in ("pgd", "fgsm", "square") for e in (0.0, 0.1)
    ]
    for row in rows:
        assert row.keys() >= SCHEMA_RESULT
        assert row["norm"] == "linf" and row["wall_time_s"] >= 0 and row["images_per_s"] > 0
        seconds = report["n_samples"] / row["images_per_s"]
        assert seconds == pytest.approx(row["wall_time_s"], rel=1e-3, abs=0.005)
        if row["eps"] == 0:
            assert row["robust_acc"] == report["clean_acc"]
    assert rows[0]["params"]["attack"] == {
        "_target_": "foolbox.attacks.LinfPGD",
        "steps": 5,
        "rel_stepsize": 0.0333333,
        "random_start": True,
    }
    worst = {w["eps"]: w["robust_acc"] for w in report["worst_case"]}
    assert all(worst[r["eps"]] <= r["robust_acc"] for r in rows)
    assert report["diagnostics"] and all(
        d.keys() == {"name", "status", "detail"} and d["status"] in ("pass", "warn")
        for d in report["diagnostics"]
    )
    report_md = (tmp_path / "report.md").read_text()
    assert "| pgd | gradient | linf | 0.1 |" in report_md
    assert "| wall_time_s | images_per_s |" in report_md


def test_cli_refuses_a_truncated_checkpoint_in_one_line(checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    result = run_attack_cli(f"ckpt_path={truncated}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: checkpoint {truncated} is truncated or not a PyTorch file")
    )
    assert "Traceback" not in result.stderr


def test_cli_lists_the_attacks_when_one_does_not_exist(tmp_path):
    result = run_attack_cli("ckpt_path=x.ckpt", "attack=[pgd,nope]", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown attack nope; known: autoattack, bpda, cw, deepfool, deepfool_l2, eot_pgd, "
        "fgsm, hsj, l2_pgd, pgd, square, transfer, vga"
    )


def test_missing_and_foreign_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        load_checkpoint(text)
    pickled = tmp_path / "plain.pkl"
    pickled.write_bytes(pickle.dumps({"a": 1}))  # not a torch.save zip archive
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        load_checkpoint(pickled)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a kwta-lightning training checkpoint"):
        load_checkpoint(foreign)


def test_a_checkpoint_that_runs_code_on_load_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()
