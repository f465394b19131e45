"""kwta-table1: the reproduction's Table 1 end to end, on fake data with tiny budgets."""

import pytest

from tests.helpers import run_cli

TRAIN = [
    "experiment=repro_finetune",
    "data=fake",
    "data.image_size=16",
    "data.resize=false",
    "model.pretrained=false",  # no weight downloads in tests
    "debug=limit",
    "trainer.max_epochs=1",
    "logger=csv",
]
ATTACK = [
    "attack=[vga,pgd,deepfool]",
    "eps=[0.031]",
    "n_samples=8",
    "attack.pgd.steps=2",
    "attack.pgd.restarts=1",
    "attack.vga.steps=2",
    "attack.deepfool.attack.steps=2",
    "diagnostics.convergence_doublings=0",
]


def _list(overrides: list[str]) -> str:
    return "[" + ",".join(f"'{o}'" for o in overrides) + "]"


@pytest.mark.slow
def test_table1_trains_attacks_and_tabulates_each_stage(tmp_path):
    args = [f"train_overrides={_list(TRAIN)}", f"attack_overrides={_list(ATTACK)}"]
    done = run_cli(*args, f"hydra.run.dir={tmp_path}", script="kwta-table1", timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "summary.md").read_text().splitlines()
    header, rows = table[0], table[2:]
    for column in ("test_acc", "vga linf eps=0.031", "pgd linf eps=0.031", "worst eps=0.031"):
        assert column in header
    assert sorted(row.split("|")[1].strip() for row in rows) == ["kwta_0.1", "kwta_0.2", "relu"]
    # each k-WTA stage started from the stage before it
    assert "init_from='" + str(tmp_path / "kwta_0.2") in done.stderr + done.stdout

    again = run_cli(*args, f"hydra.run.dir={tmp_path}", script="kwta-table1", timeout=900)
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count("already") == 6  # nothing trained or attacked again


def test_table1_refuses_a_stage_that_fails(tmp_path):
    bad = _list(["experiment=repro_finetune", "data=fake", "optimizer.lr=-1"])
    done = run_cli(f"train_overrides={bad}", f"hydra.run.dir={tmp_path}", script="kwta-table1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: step 1/7: train relu failed; its log is in the folder named above"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages=3", "error: stages=3: must be a list of {name, act, gamma}"),
        (
            "stages=[{name:relu}]",
            "error: stages[0]={'name': 'relu'}: must have name, act and gamma",
        ),
        ("train_overrides=x", "error: train_overrides=x: must be a list of overrides"),
    ],
)
def test_table1_refuses_a_config_that_is_no_pipeline(tmp_path, override, message):
    done = run_cli(override, f"hydra.run.dir={tmp_path}", script="kwta-table1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [message]
