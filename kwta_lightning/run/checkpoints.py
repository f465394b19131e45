"""Checkpoint files: written atomically, read weights-only, and chosen for a resume.

Every load goes through :func:`load_weights_only`: ``torch.load(weights_only=True)`` passed
explicitly, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` cannot override (it only changes the
default), so a checkpoint crafted to run code on load is refused, never executed. The trainer's
own loads (``fit(ckpt_path=...)``, ``test(ckpt_path=...)``) go through
:class:`SafeCheckpointIO`, which uses it too.
"""

import logging
import os
import pickle
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kwta_lightning.errors import ConfigError, KWTAError

log = logging.getLogger(__name__)

RESUME_KEYS = ("state_dict", "loops", "optimizer_states", "callbacks")  # what a resume reads


class CheckpointError(KWTAError):
    """A checkpoint file is missing, truncated, unsafe or not a training checkpoint."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _unsafe_reason(err: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names the object, not its advice on how to load anyway."""
    lines = [line.strip() for line in str(err).splitlines()]
    named = [line for line in lines if line.startswith(("WeightsUnpickler error", "Unsupported"))]
    return named[0] if named else "an object that is not a tensor or a plain value"


def load_weights_only(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint's contents, unpickling only tensors and plain values.

    ``required``: top-level keys the file must hold. CheckpointError names what is wrong in one
    line; it never suggests loading with ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives
        raise CheckpointError(f"checkpoint {path} is empty, truncated or not a PyTorch file")
    try:
        with torch.serialization.safe_globals([AttributeDict]):  # hparams of older modules
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain "
            f"values, which could run code on load ({_unsafe_reason(err)})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch file ({_first_line(err)})"
        ) from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a training checkpoint of train.py "
            f"(missing {', '.join(missing)})"
        )
    return ckpt


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, with weights-only loads and atomic saves.

    Lightning writes a checkpoint in place, so a kill mid-write leaves a half-written last.ckpt;
    here it is written to a temporary file in the same folder and renamed over the old one
    (``os.replace`` is atomic), so a checkpoint file is always whole.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with partial.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_weights_only(path)


def resume_candidates(output_dir: Path) -> list[Path]:
    """The run folder's checkpoints a resume may start from, newest first.

    last.ckpt (epoch end, every few minutes or steps, on SIGTERM and on SLURM's requeue signal)
    and best.ckpt (an older epoch).
    """
    files = (output_dir / "checkpoints").glob("*.ckpt")
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_good_checkpoint(output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of the run folder that loads, skipping bad ones with a warning.

    None when the folder has no checkpoint; CheckpointError (one line) when it has only bad ones.
    """
    candidates = resume_candidates(output_dir)
    refused = []
    for path in candidates:
        try:
            return path, load_weights_only(path, RESUME_KEYS)
        except CheckpointError as err:
            log.warning("cannot resume from it: %s", err)
            refused.append(str(err))
    if refused:
        raise CheckpointError(
            f"no good checkpoint to resume from in {output_dir} ({len(refused)} refused; "
            f"newest: {refused[0]}); pass resume=false to train anew"
        )
    return None


def periodic_checkpoint(
    dirpath: str, minutes: float | None = 10, steps: int | None = None
) -> ModelCheckpoint | None:
    """last.ckpt every ``steps`` training steps, else every ``minutes`` (None when both are null).

    Besides the one at each epoch end, so a killed run loses at most that much work.
    """
    for name, value in (("minutes", minutes), ("steps", steps)):
        if value is not None and value <= 0:
            raise ConfigError(f"periodic_checkpoint.{name} must be > 0 or null, got {value}")
    if steps is None and minutes is None:
        return None
    every = (
        {"every_n_train_steps": steps}
        if steps is not None
        else {"train_time_interval": timedelta(minutes=minutes)}
    )
    return ModelCheckpoint(
        dirpath=dirpath, filename="last", enable_version_counter=False, save_top_k=1, **every
    )
