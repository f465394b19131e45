"""Logger factories the logger configs instantiate."""

import netrc
import os
import socket
from collections.abc import Sequence

from lightning.pytorch.loggers import WandbLogger


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


def wandb_logger(
    save_dir: str,
    project: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    mode: str = "auto",
) -> WandbLogger:
    """A WandbLogger that runs offline when W&B cannot be reached (sync later with wandb sync)."""
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        name=name,
        group=group,
        tags=[str(t) for t in tags],
        mode=wandb_mode(mode),
    )
