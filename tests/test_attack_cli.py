"""attack.py as a user runs it on a train.py checkpoint; unsafe or broken checkpoints refused."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kwta_lightning.attacks.checkpoint import CheckpointError, load_checkpoint
from kwta_lightning.attacks.runner import radii
from kwta_lightning.errors import ConfigError
from tests.helpers import command, run_cli, train_tiny_cnn

ROOT = Path(__file__).resolve().parents[1]

SCHEMA_RESULT = {"attack", "norm", "eps", "robust_acc", "success_rate", "params"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """best.ckpt of a short k-WTA CNN run on fake data."""
    return train_tiny_cnn(tmp_path_factory.mktemp("train"))


def test_the_default_radii_are_the_threat_model_saved_with_the_checkpoint(checkpoint):
    threat = load_checkpoint(checkpoint)["datamodule_hyper_parameters"]["threat"]
    assert threat == {  # conf/data/fake.yaml's
        "eps": [0.031],
        "l2_eps": [0.5],
        "adv_train": {"eps": 0.031, "step_size": 0.007, "steps": 10},
    }
    assert radii(None, threat, "eps") == [0.031] and radii([0.2, 0.1], threat, "eps") == [0.1, 0.2]
    with pytest.raises(ConfigError, match="has no threat model"):
        radii(None, None, "l2_eps")  # a checkpoint from before threat models: give l2_eps=[...]


def run_attack_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, script="attack.py")


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


QUICK = [
    "attack=[pgd,fgsm,square]",
    "attack.pgd.steps=5",
    "attack.pgd.restarts=1",
    "attack.square.n_queries=20",
    "n_samples=24",
    "batch_size=16",
    "eps=[0,0.1]",
    "diagnostics.unbounded_steps=5",
    "diagnostics.convergence_doublings=1",
]


@pytest.fixture(scope="module")
def quick_run(checkpoint, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """attack.py's QUICK suite on the checkpoint: its run folder and what it printed."""
    out = tmp_path_factory.mktemp("quick")
    result = run_attack_cli(
        f"ckpt_path={checkpoint}", *QUICK, f"cache_dir={out / 'cache'}", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_cli_writes_the_report_files_and_schema(checkpoint, quick_run):
    tmp_path, result = quick_run
    for name in (
        "report.json",
        "outcomes.json",
        "report.md",
        "robust_accuracy.png",
        "examples.png",
    ):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B ran offline in the run folder"
    assert "verdict" in result.stdout and "unbounded_eps" in result.stdout
    # a log line per attack and eps, with the time left, also with stdout in a pipe; the count
    # includes the diagnostics' own runs (the unbounded probe, PGD doubled at both eps)
    out = (result.stdout + result.stderr).splitlines()
    lines = [line for line in out if " linf eps=" in line and ": robust " in line]
    assert "[1/9] pgd linf eps=0: robust" in lines[0] and "left" in lines[0]
    assert "[9/9] pgd_steps10 linf eps=0.1: robust" in lines[-1] and lines[-1].endswith("done")

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checkpoint"] == str(checkpoint)
    assert report["n_samples"] == 24 and report["data"] == "fake"
    assert report["epsilons"] == {"linf": [0.0, 0.1]}  # no L2 attack, no L2 radii
    assert report["complete"] is True
    rows = report["results"]
    assert [(r["attack"], r["eps"]) for r in rows] == [
        *((a, e) for a in ("pgd", "fgsm", "square") for e in (0.0, 0.1)),
        ("pgd_steps10", 0.0),  # the convergence check's doubled PGD
        ("pgd_steps10", 0.1),
    ]
    for row in rows:
        assert row.keys() >= SCHEMA_RESULT
        assert row["norm"] == "linf" and row["wall_time_s"] >= 0 and row["images_per_s"] > 0
        seconds = report["n_samples"] / row["images_per_s"]
        assert seconds == pytest.approx(row["wall_time_s"], rel=1e-3, abs=0.01)
        if row["eps"] == 0:
            assert row["robust_acc"] == report["clean_acc"]
    assert rows[0]["params"]["steps"] == 5 and rows[0]["params"]["restarts"] == 1
    assert rows[-1]["params"]["steps"] == 10
    verdict = {v["eps"]: v for v in report["verdict"]}
    assert all(verdict[r["eps"]]["robust_acc"] <= r["robust_acc"] for r in rows)
    assert verdict[0.1].keys() >= {"robust_acc", "norm", "masking_suspected", "reasons"}
    assert report["diagnostics"] and all(
        d.keys() == {"name", "status", "detail", "norm", "eps"} and d["status"] in ("pass", "warn")
        for d in report["diagnostics"]
    )
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())
    assert len(outcomes["indices"]) == 24 and len(set(outcomes["indices"])) == 24
    assert all(len(r["robust"]) == 24 for r in outcomes["results"])
    report_md = (tmp_path / "report.md").read_text()
    assert report_md.index("## Verdict") < report_md.index("## Attacks")
    assert "| pgd | gradient | linf | 0.1 |" in report_md
    assert "| wall_time_s | images_per_s |" in report_md


@pytest.mark.slow
def test_a_killed_run_keeps_its_finished_attacks_and_a_rerun_resumes(checkpoint, tmp_path):
    args = [
        f"ckpt_path={checkpoint}",
        *QUICK,
        "attack.square.n_queries=100000",
        f"cache_dir={tmp_path / 'cache'}",
        "wandb.mode=disabled",
    ]
    first = tmp_path / "first"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "attack.py"), *args, f"hydra.run.dir={first}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in process.stdout:  # killed the moment square starts: pgd and fgsm are done
        if "square: 24 images at eps" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = json.loads((first / "report.json").read_text())
    assert kept["complete"] is False
    assert [r["attack"] for r in kept["results"]] == ["pgd", "pgd", "fgsm", "fgsm"]

    second = tmp_path / "second"
    rerun = run_attack_cli(*args, "attack.square.n_queries=20", f"hydra.run.dir={second}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert log.count("reused from the cache") == 4  # pgd and fgsm at two eps; square runs anew
    resumed = json.loads((second / "report.json").read_text())
    for old, new in zip(kept["results"], resumed["results"], strict=False):
        assert (old["attack"], old["eps"], old["n_robust"]) == (
            new["attack"],
            new["eps"],
            new["n_robust"],
        )


@pytest.mark.slow
def test_merged_reports_give_the_per_input_worst_case(checkpoint, quick_run, tmp_path):
    common = [f"ckpt_path={checkpoint}", *QUICK[4:], "wandb.mode=disabled", "cache_dir=null"]
    fgsm_only = run_attack_cli(*common, "attack=[fgsm]", f"hydra.run.dir={tmp_path / 'a'}")
    assert fgsm_only.returncode == 0, fgsm_only.stderr[-3000:]
    merged = subprocess.run(
        [
            *command("kwta-merge"),
            str(tmp_path / "a"),
            str(quick_run[0]),
            "--out",
            str(tmp_path / "merged"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert merged.returncode == 0, merged.stderr[-3000:]
    outcomes = json.loads((tmp_path / "merged" / "outcomes.json").read_text())
    report = json.loads((tmp_path / "merged" / "report.json").read_text())
    for v in report["verdict"]:
        here = [
            r["robust"]
            for r in outcomes["results"]
            if (r["norm"], r["eps"]) == (v["norm"], v["eps"])
        ]
        assert {r["attack"] for r in outcomes["results"]} >= {"fgsm", "pgd", "square"}
        minimum = [all(bit == "1" for bit in bits) for bits in zip(*here, strict=True)]
        assert v["n_robust"] == sum(minimum)


def test_cli_refuses_a_truncated_checkpoint_in_one_line(checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    result = run_attack_cli(f"ckpt_path={truncated}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: checkpoint {truncated} is empty, truncated or not a PyTorch file")
    )
    assert "Traceback" not in result.stderr


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
    with pytest.raises(CheckpointError, match="not a training checkpoint of train.py"):
        load_checkpoint(foreign)


def test_a_checkpoint_that_runs_code_on_load_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()
