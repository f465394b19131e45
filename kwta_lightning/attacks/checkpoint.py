"""Rebuild a model and its data module from a checkpoint without running pickled code.

``torch.load(..., weights_only=True)`` only unpickles tensors and plain containers, so a
checkpoint crafted to run code on load is refused instead of executed. Lightning checkpoints from
``train.py`` hold only plain types; Lightning's ``AttributeDict`` (hyper-parameters of older
modules) is the one class allow-listed.
"""

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.data import AttributeDict

from kwta_lightning.data import ImageDataModule
from kwta_lightning.errors import ConfigError, KWTAError
from kwta_lightning.module import KWTAClassifier

REQUIRED_KEYS = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters")


class CheckpointError(KWTAError):
    """The checkpoint file is missing, unreadable, unsafe or not from train.py."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded weights-only; CheckpointError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch file (no zip archive)"
        )
    try:
        with torch.serialization.safe_globals([AttributeDict]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain "
            f"values, which could run code on load ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch file ({first})"
        ) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a kwta-lightning training checkpoint "
            f"(missing {', '.join(missing)})"
        )
    return ckpt


def build_model(ckpt: dict[str, Any]) -> KWTAClassifier:
    """The trained classifier in eval mode, on CPU."""
    try:
        model = KWTAClassifier(**ckpt["hyper_parameters"])
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint does not rebuild its model ({first})") from None
    return model.eval()


def build_data(ckpt: dict[str, Any], root: str) -> ImageDataModule:
    """The training run's data module, reading from ``root``, test split ready."""
    hparams = dict(ckpt["datamodule_hyper_parameters"]) | {"root": root, "num_workers": 0}
    data = ImageDataModule(**hparams)
    data.prepare_data()
    data.setup()
    return data


def choose_samples(
    data: ImageDataModule, n_samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A seeded random choice of ``n_samples`` test images (pixels in [0, 1]), their labels and
    their indices in the test set."""
    test = data.test_set
    if not 0 < n_samples <= len(test):
        raise ConfigError(
            f"n_samples must lie in [1, {len(test)}] for {data.name}, got {n_samples}"
        )
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n_samples]
    indices = order.tolist()
    images, labels = zip(*(test[i] for i in indices), strict=True)
    return torch.stack(images), torch.tensor(labels), indices
