"""One training run from a composed config: fit, test the best checkpoint, write metrics.json.

The same run works as one job of a Hydra sweep (a failing job is recorded, the sweep goes on) and
under DDP (Lightning re-launches this script once per extra device; the children join the
parent's run folder and only rank zero writes files).
"""

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kwta_lightning.console import error_line, print_config_tree, print_summary
from kwta_lightning.errors import ConfigError
from kwta_lightning.summarize import ERROR_FILE

log = logging.getLogger(__name__)

OBJECTIVES = ("val_acc_best", "test_acc")  # what train.py can return to a sweeper (maximised)
DDP_CHILD_ARGS = "KWTA_DDP_CHILD_ARGS"  # the job a DDP child process must run (JSON list)


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig) -> float | None:
    """train.py's task function: train, and return ``cfg.objective`` for the sweeper.

    In a sweep a failure must not stop the other jobs: a one-line error and the traceback go to
    error.txt in the job folder and the job returns None, which every launcher records as a
    finished job and the Optuna sweeper as a failed trial. Outside a sweep errors propagate.
    """
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective}")
    if not in_sweep():
        return _objective(cfg, train(cfg))
    try:
        return _objective(cfg, train(cfg))
    except Exception as err:
        log.exception("job failed; the sweep goes on")
        text = f"error: {error_line(err)}\n\n{traceback.format_exc()}"
        (Path(cfg.paths.output_dir) / ERROR_FILE).write_text(text)
        return None


def _objective(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    value = metrics[cfg.objective]
    return None if value is None else float(value)


# Overrides that keep a process from writing Hydra's files (.hydra/, the log) a second time.
NO_HYDRA_OUTPUT = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def ddp_child_argv(argv: list[str]) -> list[str]:
    """The command line this process must run: ``argv``, unless it is a DDP process of rank > 0.

    Lightning's DDP launcher re-runs the script with the parent's command line. Under Hydra that
    would open new run folders and logs, and under ``-m`` start the whole sweep again. So the
    parent puts its own job in $KWTA_DDP_CHILD_ARGS (see ``_pin_ddp_children``) and a child
    (LOCAL_RANK > 0) runs exactly that job, in the parent's folder. Processes that srun or
    torchrun started (SLURM_PROCID or RANK > 0) keep their command line but write no Hydra files.
    """
    if int(os.environ.get("LOCAL_RANK", "0")) > 0 and DDP_CHILD_ARGS in os.environ:
        return [argv[0], *json.loads(os.environ[DDP_CHILD_ARGS])]
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) > 0:
        return [*argv, *NO_HYDRA_OUTPUT]
    return argv


def _pin_ddp_children(trainer: L.Trainer, output_dir: Path) -> None:
    """Tell the processes Lightning is about to launch which job and folder they belong to."""
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


def _resume_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from: ckpt_path, else last.ckpt of this run folder if there.

    A run folder holds last.ckpt already when a SLURM job is resubmitted after a timeout.
    """
    if ckpt_path is None:
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info("resuming from %s (found in the run folder)", last)
            return str(last)
        return None
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path {ckpt_path} does not exist (resume needs a .ckpt file)")
    return ckpt_path


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate each entry of a dict-of-configs section (callbacks, loggers)."""
    return [instantiate(entry) for entry in (section or {}).values() if entry]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test the model ``cfg`` describes; return the metrics written to metrics.json."""
    started = time.perf_counter()
    if rank_zero_only.rank == 0:
        print_config_tree(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    resume = _resume_path(cfg.ckpt_path, output_dir)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=loggers or False,
        **_job_devices(cfg),
    )
    _pin_ddp_children(trainer, output_dir)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
        metrics = _fit_metrics(cfg, trainer, model)
        if cfg.test:
            test = trainer.test(model, datamodule=datamodule, ckpt_path=metrics["ckpt_best"])[0]
            metrics |= {"test_acc": test["test/acc"], "test_loss": test["test/loss"]}
        metrics["wall_time_s"] = round(time.perf_counter() - started, 1)
    finally:
        if wandb.run is not None:
            wandb.finish()
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print_summary(f"{cfg.model.backbone} {cfg.act.name} on {cfg.data.name}", metrics)
    return metrics


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
        "act": cfg.act.name,
        "gamma": None if cfg.act.name == "relu" else cfg.gamma,
        "data": cfg.data.name,
        "seed": cfg.seed,
        "ckpt_best": checkpoint.best_model_path or None,
        "ckpt_last": (latest[0].best_model_path or None) if latest else None,
        "wall_time_s": None,
        "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    }
