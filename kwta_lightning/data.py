"""One LightningDataModule over torchvision's image classification sets.

Images reach the model as tensors in [0, 1]: no normalisation here (the model's first layer does
it), so attacks can work in pixel space. The training set is split into train and validation with
a seeded permutation; the validation part is never augmented.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from kwta_lightning.errors import ConfigError, DataMissing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """How to open one torchvision data set and what its folder must hold."""

    open: Callable[..., Dataset]  # (root, train, transform, download) -> Dataset
    files: str
    augment: Sequence[Callable] = ()


def _train_flag(cls: type) -> Callable[..., Dataset]:
    return lambda root, train, **kw: cls(root, train=train, **kw)


def _svhn(root: str, train: bool, **kw) -> Dataset:
    return datasets.SVHN(root, split="train" if train else "test", **kw)


_CIFAR_AUGMENT = (transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip())
_MNIST_FILES = "{train,t10k}-{images-idx3,labels-idx1}-ubyte"

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(_train_flag(datasets.MNIST), f"MNIST/raw/{_MNIST_FILES}"),
    "fashion_mnist": DatasetSpec(
        _train_flag(datasets.FashionMNIST), f"FashionMNIST/raw/{_MNIST_FILES}"
    ),
    "cifar10": DatasetSpec(
        _train_flag(datasets.CIFAR10),
        "cifar-10-batches-py/ (data_batch_1..5, test_batch)",
        _CIFAR_AUGMENT,
    ),
    "cifar100": DatasetSpec(
        _train_flag(datasets.CIFAR100), "cifar-100-python/ (train, test, meta)", _CIFAR_AUGMENT
    ),
    "svhn": DatasetSpec(_svhn, "train_32x32.mat and test_32x32.mat"),
}


class ImageDataModule(L.LightningDataModule):
    """CIFAR-10/100, SVHN, MNIST, Fashion-MNIST, or ``fake`` (random images, for tests).

    ``num_classes``, ``in_channels``, ``image_size``, ``mean`` and ``std`` describe the data set;
    the model config reads them from here, and ``mean``/``std`` are what the model normalises with.
    ``*_subset`` options keep a seeded random part of a split, for quick runs. ``resize`` scales
    every image to ``image_size`` (after augmentation), e.g. 224 px for ImageNet-pretrained models.
    """

    def __init__(
        self,
        name: str,
        root: str = "data",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        augment: bool = True,
        resize: bool = False,
        download: bool = True,
        val_size: int = 5000,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        batch_size: int = 128,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if name not in DATASETS and name != "fake":
            known = ", ".join([*DATASETS, "fake"])
            raise ConfigError(f"unknown data set {name!r}; known: {known}")
        self.save_hyperparameters(logger=False)
        self.name, self.root = name, Path(root)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.mean, self.std = list(mean), list(std)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _open(self, train: bool, transform: Callable, download: bool) -> Dataset:
        if self.name == "fake":
            return datasets.FakeData(
                size=1000 if train else 200,
                image_size=(self.in_channels, self.image_size, self.image_size),
                num_classes=self.num_classes,
                transform=transform,
                random_offset=0 if train else 10_000,
            )
        spec = DATASETS[self.name]
        root = str(self.root)
        try:
            return spec.open(root, train, transform=transform, download=False)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            if not download:
                raise DataMissing(self._missing_message("download=false")) from None
        try:
            return spec.open(root, train, transform=transform, download=True)
        except Exception as err:
            raise DataMissing(self._missing_message(f"download failed: {err}")) from err

    def _missing_message(self, why: str) -> str:
        files = DATASETS[self.name].files
        return f"{self.name} not found in {self.root.resolve()} ({why}); the folder needs {files}"

    def prepare_data(self) -> None:
        for train in (True, False):
            self._open(train, transforms.ToTensor(), self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        resize = [transforms.Resize(self.image_size)] if self.hparams.resize else []
        to_tensor = transforms.Compose([*resize, transforms.ToTensor()])
        augment = DATASETS[self.name].augment if self.name in DATASETS else ()
        train_transform = (
            transforms.Compose([*augment, to_tensor]) if self.hparams.augment else to_tensor
        )
        full_train = self._open(True, train_transform, download=False)
        full_val = self._open(True, to_tensor, download=False)  # same images, no augmentation
        val_size = self.hparams.val_size
        if not 0 < val_size < len(full_train):
            raise ConfigError(f"data.val_size must lie in (0, {len(full_train)}), got {val_size}")
        order = torch.randperm(len(full_train), generator=self._generator()).tolist()
        self.train_set = self._subset(full_train, order[val_size:], self.hparams.train_subset)
        self.val_set = self._subset(full_val, order[:val_size], self.hparams.val_subset)
        test = self._open(False, to_tensor, download=False)
        self.test_set = self._subset(test, range(len(test)), self.hparams.test_subset)
        self._check_shape(self.train_set[0][0])
        log.info(
            "%s: %d train, %d val, %d test images",
            self.name,
            len(self.train_set),
            len(self.val_set),
            len(self.test_set),
        )

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.hparams.seed)

    def _subset(self, dataset: Dataset, indices: Sequence[int], size: int | None) -> Subset:
        if size is not None:
            picks = torch.randperm(len(indices), generator=self._generator())[:size].tolist()
            indices = [indices[i] for i in picks]
        return Subset(dataset, list(indices))

    def _check_shape(self, image: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(image.shape) != expected:
            raise ConfigError(
                f"{self.name} images have shape {tuple(image.shape)}, but data config says "
                f"{expected} (in_channels, image_size)"
            )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
