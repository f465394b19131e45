"""One training run from a composed config: fit, test the best checkpoint, write metrics.json.

A run folder is one run, however often it is killed and started again: started again (the same
command, or its sweep again) it resumes from its newest good checkpoint, refuses a config that
would make it another run, and a finished run just reports its metrics. SIGTERM and SIGINT stop
it at the end of the batch with a checkpoint of that step and exit status 128 + the signal.

The same run works as one job of a Hydra sweep (the job trains in a child process it watches, so
a killed job is recorded and the sweep goes on: see ``jobs``) and under DDP (Lightning re-launches
this script once per extra device; the children join the parent's run folder and only rank
zero writes files).
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kwta_lightning.core.activations import activation_label, uses_gamma
from kwta_lightning.errors import ConfigError, KWTAError
from kwta_lightning.run.checkpoints import (
    RESUME_KEYS,
    SafeCheckpointIO,
    load_weights_only,
    newest_good_checkpoint,
)
from kwta_lightning.run.console import error_line, print_config_tree, print_summary, quiet_libraries
from kwta_lightning.run.jobs import (
    DDP_CHILD_ARGS,
    NO_HYDRA_OUTPUT,
    in_sweep,
    record_failure,
    run_in_child,
    sweep_job,
)
from kwta_lightning.run.loggers import AppendingCSVLogger, AppendingTensorBoardLogger
from kwta_lightning.run.resume import ResumeState, check_same_run, move_previous_run
from kwta_lightning.run.validation import check_values

log = logging.getLogger(__name__)

OBJECTIVES = ("val_acc_best", "test_acc")  # what train.py can return to a sweeper (maximised)
Resume = tuple[Path, dict[str, Any]]  # a checkpoint to resume from, and its contents


class Stopped(SystemExit):
    """The run stopped on a signal after saving a checkpoint; the exit status is 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.message = message


def run_job(cfg: DictConfig) -> float | None:
    """train.py's task function: train, and return ``cfg.objective`` for the sweeper.

    In a sweep a failure must not stop the other jobs: the job trains in a child process, a
    one-line error (and the traceback, when there is one) goes to error.txt in the job folder and
    the job returns None, which every launcher records as a finished job and the Optuna sweeper
    as a failed trial. Outside a sweep errors propagate.
    """
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective}")
    output_dir = Path(cfg.paths.output_dir)
    if in_sweep():
        return _objective(cfg, _sweep_job(cfg, output_dir))
    if sweep_job() is None:
        return _objective(cfg, train(cfg))
    try:  # the child process of a sweep job: report the failure to the job
        return _objective(cfg, train(cfg))
    except Stopped as err:
        record_failure(output_dir, err.message)
        raise
    except Exception as err:
        record_failure(output_dir, error_line(err), traceback.format_exc())
        raise


def _sweep_job(cfg: DictConfig, output_dir: Path) -> dict[str, Any] | None:
    """A job of a sweep: its metrics if it finished before, else those of its child's run."""
    try:
        check_values(cfg)
        done = _finished(cfg, output_dir, _resume_point(cfg, output_dir, move=False))
    except KWTAError as err:
        record_failure(output_dir, error_line(err))
        log.error("job failed; the sweep goes on: %s", error_line(err))
        return None
    if done is not None:
        log.info("job already finished: %s", output_dir)
        return done
    devices = _job_devices(cfg)
    extra = [f"trainer.devices={devices['devices']}"] if devices else []
    return run_in_child(output_dir, extra)


def _objective(cfg: DictConfig, metrics: dict[str, Any] | None) -> float | None:
    value = None if metrics is None else metrics[cfg.objective]
    return None if value is None else float(value)


# Overrides that keep a process from writing Hydra's files (.hydra/, the log) a second time.
def _pin_ddp_children(trainer: L.Trainer, output_dir: Path) -> None:
    """Tell the processes Lightning is about to launch which job and folder they belong to."""
    # Lightning has no public way to ask whether its launcher re-runs this script per device:
    # every launcher class is private (this one is in lightning.pytorch.strategies.launchers'
    # __all__), and the public strategy settings do not tell it apart from a spawning launcher.
    if not isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        return
    hydra = HydraConfig.get()
    launcher = hydra.launcher._target_.rsplit(".", 1)[-1]
    if launcher != "BasicLauncher":
        raise ConfigError(
            f"DDP cannot start its processes from a {launcher} job (it re-runs train.py); sweep "
            "DDP runs with the basic launcher or hydra/launcher=slurm"
        )
    os.environ[DDP_CHILD_ARGS] = json.dumps(
        [
            *hydra.overrides.task,
            f"hydra.run.dir='{output_dir.resolve()}'",
            "hydra.mode=RUN",
            *NO_HYDRA_OUTPUT,
        ]
    )


def _job_devices(cfg: DictConfig) -> dict[str, Any]:
    """In a sweep of one-GPU jobs on a multi-GPU machine, job n takes GPU n mod #GPUs.

    Parallel (joblib) jobs would otherwise all train on GPU 0.
    """
    gpus = torch.cuda.device_count()
    trainer = cfg.trainer
    if not in_sweep() or gpus < 2 or trainer.devices != 1 or trainer.accelerator == "cpu":
        return {}
    return {"devices": [HydraConfig.get().job.num % gpus]}


def _resume_point(cfg: DictConfig, output_dir: Path, move: bool = True) -> Resume | None:
    """The checkpoint this run continues from, loaded weights-only; None to start afresh.

    ``ckpt_path`` when given (any run's checkpoint, the user's choice). Otherwise, with
    ``resume=true``, the newest good checkpoint of the run folder (a resubmitted job, a run
    started again), refused when the config would make it another run; with ``resume=false``
    what an earlier run left in the folder is moved aside (when ``move``) and training starts anew.
    """
    if not isinstance(cfg.resume, bool):
        raise ConfigError(f"resume must be true or false, got {cfg.resume!r}")
    if cfg.ckpt_path is not None:
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(
                f"ckpt_path {cfg.ckpt_path} does not exist (resume needs a .ckpt file)"
            )
        return Path(cfg.ckpt_path), load_weights_only(cfg.ckpt_path, RESUME_KEYS)
    if not cfg.resume:
        if move and rank_zero_only.rank == 0 and (moved := move_previous_run(output_dir)):
            log.warning("resume=false: the earlier run in this folder moved to %s", moved)
        return None
    found = newest_good_checkpoint(output_dir)
    if found is not None:
        check_same_run(output_dir, *found, _run_config(cfg))
        log.info("resuming from %s (found in the run folder)", found[0])
    return found


def _run_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as composed (interpolations kept: a moved folder is still the same run)."""
    return OmegaConf.to_container(cfg, resolve=False)


def _finished(cfg: DictConfig, output_dir: Path, resume: Resume | None) -> dict[str, Any] | None:
    """The metrics of the run, when the folder's run already finished what ``cfg`` asks."""
    metrics_file = output_dir / "metrics.json"
    if resume is None or cfg.ckpt_path is not None or not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    return metrics if metrics.get("epochs") == cfg.trainer.max_epochs else None


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate each entry of a dict-of-configs section (callbacks, loggers); None: left out."""
    made = [instantiate(entry) for entry in (section or {}).values() if entry]
    return [item for item in made if item is not None]


class StopOnSignal(Callback):
    """On SIGTERM or SIGINT (and SLURM's requeue signal): finish the batch, save ``path``, stop.

    Lightning stops at the end of the batch on SIGTERM (what SLURM and most schedulers send
    before a kill) but saves nothing, and its SIGINT handling raises in the middle of a step;
    here SIGINT is turned into SIGTERM (a second Ctrl-C interrupts at once) and the stop saves
    a checkpoint of the step. Lightning's OnExceptionCheckpoint would save on any exception,
    a crash's half-done step included, and changes how runs without ``ckpt_path`` start.
    On SLURM, SIGUSR1 (sent before the time limit, see conf/hydra/launcher/slurm.yaml) stops
    the same way and then requeues the job: Lightning's own requeue saves from inside the signal
    handler, which can fall between two parameters' updates of one optimizer step.
    """

    def __init__(self, path: Path, slurm_job: str | None) -> None:
        self.path, self.slurm_job = path, slurm_job
        self.signum, self.step, self.deferred = signal.SIGTERM, 0, False

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        if self.slurm_job is not None:
            signal.signal(signal.SIGUSR1, self._on_signal)

    def on_validation_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        # Lightning stops in the middle of validation on SIGTERM, and a checkpoint saved there
        # resumes into an epoch it never trains; so hold the signal until validation is done,
        # and the run stops at the epoch end (or the batch end, with mid-epoch validation).
        connector = trainer._signal_connector  # no public setter for received_sigterm
        if trainer.state.fn == TrainerFn.FITTING and connector.received_sigterm:
            connector.received_sigterm, self.deferred = False, True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.deferred:
            trainer._signal_connector.received_sigterm, self.deferred = True, False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        self.step = trainer.global_step
        trainer.save_checkpoint(self.path)
        for logger in trainer.loggers:
            logger.save()

    def stopped(self, output_dir: Path) -> Stopped:
        """The stop to raise; on SLURM's signal, after requeueing the job."""
        name = signal.Signals(self.signum).name
        then = f"to resume, run the same command (with hydra.run.dir={output_dir.resolve()})"
        if self.signum == signal.SIGUSR1 and self.slurm_job is not None:
            then = _requeue(self.slurm_job)
        message = f"stopped by {name} at step {self.step}; checkpoint {self.path}; {then}"
        return Stopped(self.signum, message)


def _slurm_job() -> str | None:
    """The SLURM job (array task) this run is, for requeueing; None outside SLURM."""
    if not SLURMEnvironment.detect():
        return None
    if (array_job := os.environ.get("SLURM_ARRAY_JOB_ID")) is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def _requeue(job: str) -> str:
    """Requeue the SLURM job (rank zero only); what happened, for the stop line."""
    if rank_zero_only.rank != 0:
        return "rank zero requeues the job"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as err:
        return f"requeueing SLURM job {job} failed: {err}"
    if result.returncode != 0:
        return f"requeueing SLURM job {job} failed: {result.stderr.strip() or result.returncode}"
    return f"requeued SLURM job {job}; it resumes in the same folder"


def _plugins() -> list[Any]:
    """Safe checkpoint I/O; on SLURM, the cluster environment without Lightning's requeue."""
    plugins: list[Any] = [SafeCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def _continue_logs(loggers: list[Any], resume: Resume | None) -> None:
    """Keep the logs up to the checkpoint the run continues from (nothing when afresh)."""
    step = 0 if resume is None else resume[1].get("global_step", 0)
    for logger in loggers:
        if isinstance(logger, AppendingCSVLogger) and rank_zero_only.rank == 0:
            logger.drop_rows_from(step)
        if isinstance(logger, AppendingTensorBoardLogger):
            logger.purge_from(step)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test the model ``cfg`` describes; return the metrics written to metrics.json."""
    started = time.perf_counter()
    config = _run_config(cfg)  # before instantiate, which resolves interpolations in place
    quiet_libraries()
    if rank_zero_only.rank == 0 and cfg.print_config:
        print_config_tree(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    resume = _resume_point(cfg, output_dir)
    if (done := _finished(cfg, output_dir, resume)) is not None:
        print(f"this run finished before: {output_dir / 'metrics.json'}")
        return done
    if rank_zero_only.rank == 0:
        (output_dir / "metrics.json").unlink(missing_ok=True)  # about to be out of date
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    if rank_zero_only.rank == 0:
        datamodule.prepare_data()  # a missing data set is named before the model (and the
        # k-WTA kernel's first build) takes its time; Lightning's own call then finds it there
    model: L.LightningModule = instantiate(cfg.model)
    loggers = _instantiate_all(cfg.get("logger"))
    _continue_logs(loggers, resume)
    stop = StopOnSignal(output_dir / "checkpoints" / "last.ckpt", _slurm_job())
    own = [ResumeState(config, output_dir / ".hydra"), stop]
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not loggers:  # LearningRateMonitor refuses a trainer without a logger (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks + own,
        logger=loggers or False,
        plugins=_plugins(),
        **_progress_bar(cfg),
        **_job_devices(cfg),
    )
    _pin_ddp_children(trainer, output_dir)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume and str(resume[0]))
        metrics = _fit_metrics(cfg, trainer, model)
        if cfg.test:
            test = trainer.test(model, datamodule=datamodule, ckpt_path=metrics["ckpt_best"])[0]
            metrics |= {"test_acc": test["test/acc"], "test_loss": test["test/loss"]}
        metrics["wall_time_s"] = round(time.perf_counter() - started, 1)
    except SIGTERMException:
        stopped = stop.stopped(output_dir)
        print(f"{stopped.message}", file=sys.stderr)
        raise stopped from None
    finally:
        if wandb.run is not None:
            wandb.finish()
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("metrics: %s", json.dumps(metrics))
        print_summary(f"{cfg.model.backbone} {cfg.act.name} on {cfg.data.name}", metrics)
    return metrics


def _progress_bar(cfg: DictConfig) -> dict[str, bool]:
    """No progress bar when stdout is a file (it would show only at the end; LogProgress's lines
    show as they happen), unless the config asks for one."""
    return (
        {} if "enable_progress_bar" in cfg.trainer else {"enable_progress_bar": sys.stdout.isatty()}
    )


def _fit_metrics(cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule) -> dict[str, Any]:
    checkpoint = trainer.checkpoint_callback
    if not isinstance(checkpoint, ModelCheckpoint):
        checkpoint = ModelCheckpoint()  # no checkpoints: empty paths, no score
    # The checkpoint callback's best score survives a resume; the module's running max does not.
    best = checkpoint.best_model_score
    latest = [c for c in trainer.checkpoint_callbacks if c.monitor is None]  # last.ckpt's
    if best is None and model.val_acc_best.update_called:
        best = model.val_acc_best.compute()
    return {
        "test_acc": None,
        "test_loss": None,
        "val_acc_best": None if best is None else float(best),
        "epochs": trainer.current_epoch,
        "model": cfg.model.backbone,
        "act": activation_label(cfg.act.name, cfg.act.get("options")),
        "gamma": cfg.gamma if uses_gamma(cfg.act.name, cfg.act.get("options")) else None,
        "data": cfg.data.name,
        "seed": cfg.seed,
        "ckpt_best": checkpoint.best_model_path or None,
        "ckpt_last": (latest[0].best_model_path or None) if latest else None,
        "wall_time_s": None,
        "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    }
