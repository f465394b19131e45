"""One training run from a composed config: fit, test the best checkpoint, write metrics.json."""

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import wandb
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from kwta_lightning.console import print_config_tree, print_summary
from kwta_lightning.errors import ConfigError

log = logging.getLogger(__name__)


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate each entry of a dict-of-configs section (callbacks, loggers)."""
    return [instantiate(entry) for entry in (section or {}).values() if entry]


def _resume_path(ckpt_path: str | None) -> str | None:
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path {ckpt_path} does not exist (resume needs a .ckpt file)")
    return ckpt_path


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test the model ``cfg`` describes; return the metrics written to metrics.json."""
    started = time.perf_counter()
    print_config_tree(cfg)
    L.seed_everything(cfg.seed, workers=True)
    resume = _resume_path(cfg.ckpt_path)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")), logger=loggers or False
    )
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
    output_dir = Path(cfg.paths.output_dir)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_summary(f"{cfg.model.backbone} {cfg.act.name} on {cfg.data.name}", metrics)
    return metrics


def _fit_metrics(cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule) -> dict[str, Any]:
    checkpoint = trainer.checkpoint_callback
    if not isinstance(checkpoint, ModelCheckpoint):
        checkpoint = ModelCheckpoint()  # no checkpoints: empty paths, no score
    # The checkpoint callback's best score survives a resume; the module's running max does not.
    best = checkpoint.best_model_score
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
        "ckpt_last": checkpoint.last_model_path or None,
        "wall_time_s": None,
        "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    }
