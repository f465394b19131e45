"""Sweeps and scale: multirun per launcher, failed jobs, DDP, Optuna, W&B groups, summaries."""

import csv
import json
import subprocess

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from kwta_lightning.apps import summarize
from kwta_lightning.core.data import ImageDataModule
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.errors import ConfigError
from kwta_lightning.run import loggers
from kwta_lightning.run.jobs import DDP_CHILD_ARGS, NO_HYDRA_OUTPUT, ddp_child_argv
from kwta_lightning.run.loggers import wandb_logger
from kwta_lightning.run.training import _job_devices, run_job
from tests.helpers import ROOT, command, compose_train, run_cli

# One batch of train, val and test per job, small batches: a job takes seconds.
TINY = ["data=fake", "debug=fdr", "data.batch_size=16"]
GRID = ["model=cnn,resnet18", "gamma=0.1"]  # architecture x gamma, two jobs


def read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def job_rows(sweep_dir):
    """(model, gamma, val_acc_best, test_acc) of every job, from the summary the sweep wrote."""
    rows = read_csv(sweep_dir / "summary.csv")
    return sorted((r["model"], r["gamma"], r["val_acc_best"], r["test_acc"]) for r in rows)


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("basic")
    result = run_cli("-m", *TINY, *GRID, f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result


@pytest.fixture
def multirun_hydra(tmp_path):
    """The HydraConfig of job 5 of a sweep in tmp_path/my_sweep, restored afterwards."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=cnn", "gamma=0.05"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "my_sweep")
        cfg.hydra.job.num = 5
        cfg.hydra.overrides.task = ["model=cnn", "gamma=0.05"]
    HydraConfig.instance().set_config(cfg)
    yield cfg
    HydraConfig.instance().cfg = None


@pytest.mark.slow
def test_basic_launcher_sweep_writes_one_folder_per_job_and_a_summary(basic_sweep):
    sweep_dir, result = basic_sweep
    for job in range(2):
        metrics = json.loads((sweep_dir / str(job) / "metrics.json").read_text())
        assert metrics["output_dir"] == str((sweep_dir / str(job)).resolve())
    rows = job_rows(sweep_dir)
    assert [(m, g) for m, g, _, _ in rows] == [("cnn", "0.1"), ("resnet18", "0.1")]
    assert all(float(acc) >= 0 for _, _, _, acc in rows)
    assert "sweep: all 2 jobs finished" in result.stdout
    assert (sweep_dir / "gamma_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_joblib_launcher_gives_the_same_rows(basic_sweep, tmp_path):
    result = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY,
        *GRID,
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert job_rows(tmp_path) == job_rows(basic_sweep[0])


@pytest.mark.slow
def test_submitit_local_runs_one_job(tmp_path):
    result = run_cli(
        "-m", "hydra/launcher=submitit_local", *TINY, "model=cnn", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "0" / "metrics.json").read_text())["model"] == "cnn"
    assert list((tmp_path / ".submitit").iterdir()), "submitit ran the job"


@pytest.mark.slow
def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # Real batches and W&B (offline) this time: each good job is its own W&B run.
    result = run_cli(
        "-m",
        "data=fake",
        "model=cnn",
        "data.batch_size=16",
        "debug=limit",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "logger=wandb",
        "gamma=0.1,1.5,0.2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"sweep: 1 of 3 jobs failed; their logs: {tmp_path}/1/train.log" in result.stdout
    assert "sweep: failed job 1: gamma=1.5: must be a number > 0 and <= 1" in result.stdout
    error = (tmp_path / "1" / "error.txt").read_text()
    assert error.startswith("error: gamma=1.5: must be a number > 0 and <= 1\n")
    assert "Traceback" not in error  # refused before any work: nothing more to tell
    assert not (tmp_path / "1" / "metrics.json").exists()
    for job in (0, 2):
        assert json.loads((tmp_path / str(job) / "metrics.json").read_text())["test_acc"] >= 0
    rows = {r["job"]: r for r in read_csv(tmp_path / "summary.csv")}
    assert [rows[j]["status"] for j in "012"] == ["ok", "failed", "ok"]
    assert rows["1"]["error"] == "gamma=1.5: must be a number > 0 and <= 1"

    # One W&B run per job, tagged with the job's swept value.
    runs = {job: list((tmp_path / job / "wandb").glob("offline-run-*")) for job in "02"}
    assert all(len(r) == 1 for r in runs.values()), runs
    assert runs["0"][0].name.split("-")[-1] != runs["2"][0].name.split("-")[-1]
    for job, gamma in (("0", b"gamma=0.1"), ("2", b"gamma=0.2")):
        record = next(runs[job][0].glob("run-*.wandb")).read_bytes()
        assert gamma in record


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials_and_maximises_val_acc_best(tmp_path):
    result = run_cli(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        *TINY,
        "model=cnn",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = [json.loads((tmp_path / j / "metrics.json").read_text())["val_acc_best"] for j in "01"]
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(best))
    assert set(results["best_params"]) == {"gamma", "optimizer.lr", "optimizer.weight_decay"}
    for job in "01":
        cfg = OmegaConf.load(tmp_path / job / ".hydra" / "config.yaml")
        assert 0.02 <= cfg.gamma <= 0.5
        assert 1e-3 <= cfg.optimizer.lr <= 0.3
        assert 1e-6 <= cfg.optimizer.weight_decay <= 1e-3


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_run_with_synchronised_accuracy(tmp_path):
    result = run_cli(
        "trainer=ddp_cpu",
        "data=fake",
        "model=cnn",
        "logger=csv",
        "trainer.max_epochs=1",
        "data.train_subset=256",
        "data.batch_size=32",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no folder besides the run's"
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("**/*") if p.is_file()) == [
        "best.ckpt",
        "config.yaml",
        "hparams.yaml",
        "hydra.yaml",
        "last.ckpt",
        "metrics.csv",
        "metrics.json",
        "overrides.yaml",
        "train.log",
    ]
    assert "GLOBAL_RANK: 1" not in (run / "train.log").read_text()

    # The logged accuracy is over the whole validation set (both processes' halves).
    metrics = json.loads((run / "metrics.json").read_text())
    model = KWTAClassifier.load_from_checkpoint(metrics["ckpt_best"], map_location="cpu").eval()
    data = ImageDataModule.load_from_checkpoint(metrics["ckpt_best"], num_workers=0)
    data.setup()
    with torch.no_grad():
        batches = [(model(x), y) for x, y in data.val_dataloader()]
    correct = torch.cat([logits.argmax(1) == y for logits, y in batches])
    assert len(correct) == 200
    assert correct.float().mean().item() == pytest.approx(metrics["val_acc_best"], abs=1e-6)
    rank_zero_half = correct[0::2].float().mean().item()  # what rank 0 alone would have logged
    assert rank_zero_half != pytest.approx(metrics["val_acc_best"], abs=1e-6)
    # val/loss too: the mean over both processes' batches, not rank 0's alone.
    loss = torch.cat(
        [torch.nn.functional.cross_entropy(lg, y, reduction="none") for lg, y in batches]
    )
    logged = [float(r["val/loss"]) for r in read_csv(run / "csv" / "metrics.csv") if r["val/loss"]]
    assert logged == [pytest.approx(loss.mean().item(), abs=1e-4)]


def test_ddp_child_runs_its_parents_job(monkeypatch):
    argv = ["train.py", "-m", "gamma=0.05,0.1"]
    for var in ("LOCAL_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(DDP_CHILD_ARGS, json.dumps(["gamma=0.1", "hydra.run.dir='/r/3'"]))
    assert ddp_child_argv(argv) == argv  # the parent
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp_child_argv(argv) == ["train.py", "gamma=0.1", "hydra.run.dir='/r/3'"]
    monkeypatch.delenv(DDP_CHILD_ARGS)
    assert ddp_child_argv(argv) == argv  # LOCAL_RANK without our parent: not Lightning's child
    monkeypatch.setenv("SLURM_PROCID", "3")  # one of the tasks srun started
    assert ddp_child_argv(argv) == [*argv, *NO_HYDRA_OUTPUT]


def test_wandb_runs_of_a_sweep_share_a_group_and_carry_their_overrides(multirun_hydra, tmp_path):
    logger = wandb_logger(save_dir=str(tmp_path), project="p", tags=["cnn"], mode="disabled")
    assert logger._wandb_init["group"] == "my_sweep"
    assert logger._wandb_init["tags"] == ["cnn", "model=cnn", "gamma=0.05"]
    named = wandb_logger(save_dir=str(tmp_path), project="p", group="mine", mode="disabled")
    assert named._wandb_init["group"] == "mine"


def test_wandb_auto_mode_probes_the_server_wandb_would_use(monkeypatch):
    probed = []

    def unreachable(address, timeout):
        probed.append(address)
        raise OSError("no network")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "key")
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example.org:8080")
    monkeypatch.setattr(loggers.socket, "create_connection", unreachable)
    assert loggers.wandb_mode("auto") == "offline"
    assert probed == [("wandb.example.org", 8080)]


def test_sweep_jobs_spread_over_gpus(multirun_hydra, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _job_devices(multirun_hydra) == {"devices": [1]}  # job 5 on GPU 5 mod 4
    with open_dict(multirun_hydra):
        multirun_hydra.trainer.devices = 2  # a DDP job keeps its devices
    assert _job_devices(multirun_hydra) == {}


def test_slurm_launcher_asks_for_the_trainers_gpus_and_resubmits_on_timeout():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8"]
        cfg = compose(
            "train", overrides=[*overrides, "trainer.num_nodes=2"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert launcher.max_num_timeout == 3
    assert cfg.trainer.strategy == "ddp"


def test_the_readmes_slurm_command_composes_with_the_default_trainer():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "model=cnn"]
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1, 1)
    assert launcher.partition == "gpu"


@pytest.mark.slow
def test_a_joblib_job_killed_outright_is_recorded_and_a_rerun_redoes_only_it(tmp_path):
    sweep = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY[:1],
        "debug=limit",
        "data.batch_size=16",
        "data.image_size=16",
        "model=cnn",
        "logger=csv",
        "gamma=0.2,0.1",
        "+callbacks.die._target_=tests.helpers.SigkillIf",
        "+callbacks.die.gamma=${gamma}",
        "+callbacks.die.kill_gamma=0.2",  # job 0 dies as the out-of-memory killer kills
        f"hydra.sweep.dir={tmp_path}",
    ]
    result = run_cli(*sweep)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "TerminatedWorkerError" not in result.stderr
    killed = "the training process was killed by SIGKILL (what the out-of-memory killer sends)"
    assert (tmp_path / "0" / "error.txt").read_text().startswith(f"error: {killed}")
    assert f"sweep: failed job 0: {killed}" in result.stdout
    finished = (tmp_path / "1" / "metrics.json").stat().st_mtime
    rows = {r["job"]: r["status"] for r in read_csv(tmp_path / "summary.csv")}
    assert rows == {"0": "failed", "1": "ok"}

    rerun = run_cli(*sweep)
    assert rerun.returncode == 1
    assert (tmp_path / "1" / "metrics.json").stat().st_mtime == finished
    assert "job already finished" in (tmp_path / "1" / "train.log").read_text()
    assert (tmp_path / "0" / "error.txt").read_text().startswith(f"error: {killed}")


def test_unknown_objective_is_refused(tmp_path):
    cfg = compose_train(tmp_path, ["data=fake", "objective=train_loss"])
    with pytest.raises(ConfigError, match="objective must be one of val_acc_best, test_acc"):
        run_job(cfg)
    HydraConfig.instance().cfg = None


# --- the summary, on run folders written by hand -------------------------------------------


def make_run(folder, model, act, gamma, test_acc=None, error=None):
    (folder / ".hydra").mkdir(parents=True)
    config = {"model": {"backbone": model}, "act": {"name": act}, "gamma": gamma}
    config |= {"data": {"name": "mnist"}, "seed": 42}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if error:
        (folder / "error.txt").write_text(f"error: {error}\n\nTraceback ...\n")
    else:
        metrics = {"test_acc": test_acc, "val_acc_best": test_acc + 0.01, "epochs": 3}
        (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path):
    """A sweep of 5 jobs (k-WTA cnn at 2 gammas, resnet18 at 1, a ReLU cnn, one failure)."""
    jobs = [
        ("cnn", "kwta", 0.1, 0.97),
        ("cnn", "kwta", 0.05, 0.95),
        ("cnn", "relu", 0.1, 0.99),
        ("resnet18", "kwta", 0.1, 0.98),
    ]
    for i, job in enumerate(jobs):
        make_run(tmp_path / "sweep" / str(i), *job)
    make_run(tmp_path / "sweep" / "4", "resnet18", "kwta", 0.2, error="out of memory")
    report = {
        "checkpoint": "sweep/0/checkpoints/best.ckpt",  # relative to where attack.py ran
        "clean_acc": 0.97,
        "n_samples": 500,
        "results": [
            {"attack": "pgd", "norm": "linf", "eps": 0.3, "robust_acc": 0.41, "success_rate": 0.5},
            {"attack": "square", "norm": "linf", "eps": 0.3, "robust_acc": 0.2, "params": {}},
        ],
        "verdict": [{"norm": "linf", "eps": 0.3, "robust_acc": 0.12}],
    }
    (tmp_path / "attack" / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "attack" / "runs" / "r1" / "report.json").write_text(json.dumps(report))
    return tmp_path


def summarize_cli(*args, cwd):
    return subprocess.run(
        [*command("kwta-summarize"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_summary_table_has_every_job_and_the_attack_results_of_its_run(sweep):
    result = summarize_cli("sweep", "attack/runs", "--out", "out", cwd=sweep)
    assert result.returncode == 0, result.stderr
    rows = read_csv(sweep / "out" / "summary.csv")
    assert [(r["job"], r["model"], r["act"], r["gamma"], r["status"]) for r in rows] == [
        ("2", "cnn", "relu", "", "ok"),
        ("1", "cnn", "kwta", "0.05", "ok"),
        ("0", "cnn", "kwta", "0.1", "ok"),
        ("3", "resnet18", "kwta", "0.1", "ok"),
        ("4", "resnet18", "kwta", "0.2", "failed"),
    ]
    assert [r["test_acc"] for r in rows] == ["0.99", "0.95", "0.97", "0.98", ""]
    assert [r["pgd linf eps=0.3"] for r in rows] == ["", "", "0.41", "", ""]
    assert [r["worst eps=0.3"] for r in rows] == ["", "", "0.12", "", ""]
    assert rows[4]["error"] == "out of memory"
    markdown = (sweep / "out" / "summary.md").read_text()
    assert "| failed: out of memory |" in markdown
    assert (sweep / "out" / "gamma_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_plot_has_a_line_per_architecture_and_relu_baselines(sweep, monkeypatch):
    monkeypatch.chdir(sweep)
    runs, reports = summarize.find_inputs([sweep / "sweep", sweep / "attack"])
    rows = [summarize.load_run(run, sweep / "sweep") for run in runs]
    robust = summarize.attach_reports(rows, reports)
    assert robust == ["pgd linf eps=0.3", "square linf eps=0.3", "worst eps=0.3"]
    fig = summarize.figure(rows, robust)
    clean, pgd = fig.axes[:2]
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 4
    lines = {line.get_label(): line for line in clean.get_lines()}
    assert set(lines) == {"cnn", "resnet18", "cnn ReLU"}
    assert list(lines["cnn"].get_xdata()) == [0.05, 0.1]
    assert list(lines["cnn"].get_ydata()) == [0.95, 0.97]
    assert list(lines["cnn ReLU"].get_ydata()) == [0.99, 0.99]  # horizontal
    assert [line.get_label() for line in pgd.get_lines()] == ["cnn"]
    assert list(pgd.get_lines()[0].get_ydata()) == [0.41]


def _corrupt_metrics(sweep):
    (sweep / "sweep" / "0" / "metrics.json").write_text("{")


def _empty_report(sweep):
    (sweep / "attack" / "runs" / "r1" / "report.json").write_text("{}")


@pytest.mark.parametrize(
    ("spoil", "args", "message"),
    [
        (None, ["attack"], "error: no run folders (with .hydra/config.yaml) in attack"),
        (_corrupt_metrics, ["sweep"], "error: cannot read sweep/0/metrics.json"),
        (_empty_report, ["sweep", "attack"], "is not an attack report (no 'checkpoint')"),
    ],
)
def test_summary_of_bad_input_fails_with_one_line(sweep, spoil, args, message):
    if spoil:
        spoil(sweep)
    result = summarize_cli(*args, cwd=sweep)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_attack_run_folders_are_reports_not_rows(tmp_path):
    from kwta_lightning.apps.summarize import find_inputs

    for name, task in (("train_run", "train"), ("attack_run", "attack")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text(f"task_name: {task}\n")
    (tmp_path / "attack_run" / "report.json").write_text("{}")
    runs, reports = find_inputs([tmp_path])
    assert runs == [tmp_path / "train_run"]
    assert reports == [tmp_path / "attack_run" / "report.json"]
