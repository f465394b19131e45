"""Logger factories the logger configs instantiate."""

import netrc
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import wandb
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger

from kwta_lightning.training import in_sweep

MAX_TAG_LENGTH = 64  # W&B refuses longer tags


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _can_reach_wandb(timeout_s: float = 2.0) -> bool:
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def wandb_mode(mode: str = "auto") -> str:
    """``auto``: $WANDB_MODE if set, else online with an API key and network, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _has_wandb_key() and _can_reach_wandb() else "offline"


def sweep_group_and_tags() -> tuple[str | None, list[str]]:
    """In a Hydra sweep job: the sweep folder's name and the job's overrides (``gamma=0.05``, ...).

    Outside a sweep: (None, []).
    """
    if not in_sweep():
        return None, []
    hydra = HydraConfig.get()
    overrides = [o for o in hydra.overrides.task if len(o) <= MAX_TAG_LENGTH]
    return Path(hydra.sweep.dir).name, overrides


def wandb_logger(
    save_dir: str,
    project: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    mode: str = "auto",
) -> WandbLogger:
    """A WandbLogger that runs offline when W&B cannot be reached (sync later with wandb sync).

    Each job of a sweep is its own W&B run (training.py finishes it at the end of the job); the
    jobs of one sweep share a group named after the sweep folder (unless ``group`` is given) and
    are tagged with their overrides.
    """
    sweep, job_tags = sweep_group_and_tags()
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        name=name,
        group=group or sweep,
        tags=[str(t) for t in tags] + job_tags,
        mode=wandb_mode(mode),
    )


def log_images_to_wandb(
    mode: str, project: str, job_type: str, output_dir: str, images: dict[str, Path], summary: dict
) -> None:
    """Log figures (and numbers) as a W&B run of their own, unless W&B is disabled."""
    mode = wandb_mode(mode)
    if mode == "disabled":
        return
    run = wandb.init(project=project, job_type=job_type, dir=output_dir, mode=mode)
    try:
        run.log({name: wandb.Image(str(path)) for name, path in images.items()} | summary)
    finally:
        wandb.finish()
