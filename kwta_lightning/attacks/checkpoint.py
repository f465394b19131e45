"""Rebuild a model and its data module from a checkpoint without running pickled code
(``kwta_lightning.run.checkpoints.load_weights_only``)."""

from pathlib import Path
from typing import Any

import torch

from kwta_lightning.core.data import ImageDataModule
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.checkpoints import CheckpointError, load_weights_only

__all__ = ["CheckpointError", "build_data", "build_model", "choose_samples", "load_checkpoint"]

REQUIRED_KEYS = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A train.py checkpoint's contents, loaded weights-only; CheckpointError names what is
    wrong."""
    return load_weights_only(path, REQUIRED_KEYS)


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
    """The training run's data module, reading from ``root``, with its whole test split: a
    ``test_subset`` of the training run made its test quick and says nothing about the attack."""
    hparams = dict(ckpt["datamodule_hyper_parameters"])
    hparams |= {"root": root, "num_workers": 0, "test_subset": None}
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
