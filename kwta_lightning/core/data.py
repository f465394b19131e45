"""One LightningDataModule over torchvision's image classification sets.

Images reach the model as tensors in [0, 1]: no normalisation here (the model's first layer does
it), so attacks can work in pixel space. The training set is split into train and validation with
a seeded permutation; the validation part is never augmented.

With ``on_device=True`` each split is held once as a uint8 tensor on the trainer's device, and
batches are gathered (and, for training, cropped and flipped) there: no per-image work on the CPU.
"""

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms

from kwta_lightning.errors import ConfigError, DataMissing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropFlip:
    """Random ``size`` crop of the image zero-padded by ``padding``, then a horizontal flip (p=1/2).

    :meth:`transforms` is torchvision's version (per PIL image), :meth:`batch` the same draw for a
    whole uint8 batch on its device: crop offsets uniform over every position, flips independent.
    """

    size: int
    padding: int

    def transforms(self) -> list[Callable]:
        crop = transforms.RandomCrop(self.size, padding=self.padding)
        return [crop, transforms.RandomHorizontalFlip()]

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        device, pad = images.device, self.padding
        padded = F.pad(images, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # N, H, W, C
        top = torch.randint(0, height + 2 * pad - self.size + 1, (n, 1), device=device)
        left = torch.randint(0, width + 2 * pad - self.size + 1, (n, 1), device=device)
        steps = torch.arange(self.size, device=device)
        rows, cols = top + steps, left + steps
        cols = torch.where(torch.rand(n, 1, device=device) < 0.5, cols.flip(1), cols)
        picked = padded[
            torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None]
        ]
        return picked.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class DatasetSpec:
    """How to open one torchvision data set and what its folder must hold."""

    open: Callable[..., Dataset]  # (root, train, transform, download) -> Dataset
    files: str
    augment: CropFlip | None = None


def _train_flag(cls: type) -> Callable[..., Dataset]:
    return lambda root, train, **kw: cls(root, train=train, **kw)


def _svhn(root: str, train: bool, **kw) -> Dataset:
    return datasets.SVHN(root, split="train" if train else "test", **kw)


_CIFAR_AUGMENT = CropFlip(32, padding=4)
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


@functools.cache
def _fake_items(
    size: int, shape: tuple[int, int, int], num_classes: int, offset: int
) -> list[tuple[Image.Image, int]]:
    """torchvision's FakeData images and labels, made once per process.

    FakeData reseeds torch's RNG for every image, and each reseed formats a Python traceback of
    the caller (torch queues the CUDA seed lazily with it): the deeper the caller's stack, the
    slower, so made per access the fake data cost a Lightning loop far more than a plain loop.
    """
    fake = datasets.FakeData(size, shape, num_classes, random_offset=offset)
    return [fake[i] for i in range(size)]


class _Transformed(Dataset):
    """(image, label) pairs, ``transform`` applied to the image on each access."""

    def __init__(self, items: Sequence[tuple[Image.Image, int]], transform: Callable) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.items[index]
        return self.transform(image), label


class DeviceImages(Dataset):
    """One split as a uint8 tensor (N, C, H, W) and int64 labels, gathered a batch at a time.

    A DataLoader hands :meth:`__getitems__` a batch of indices; the images are picked, augmented
    (``augment``, then a resize to ``resize_to``) and turned into floats in [0, 1] on the tensors'
    device, exactly as ``ToTensor`` turns uint8 into floats. Batches come out as ``(images,
    labels)``, like the normal pipeline's, so every loop over the loaders works unchanged.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: CropFlip | None = None,
        resize_to: int | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.augment, self.resize_to = augment, resize_to

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        picks = _to_device(torch.as_tensor(indices), self.images.device)
        images = self.images[picks]
        if self.augment is not None:
            images = self.augment.batch(images)
        if self.resize_to is not None:
            images = transforms.functional.resize(images, self.resize_to)
        return images.float().div(255), self.labels[picks]

    def to(self, device: torch.device) -> "DeviceImages":
        """Move the tensors to ``device`` (a no-op where they are already)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self


def _to_device(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device``; to a GPU from pinned memory, so the copy does not wait for the GPU."""
    if device.type == "cuda":
        return indices.pin_memory().to(device, non_blocking=True)
    return indices.to(device)


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeviceImages already returns a whole batch: nothing to collate."""
    return batch


class ResumableSampler(DistributedSampler):
    """A shuffle that is a function of (seed, epoch), able to start part-way through an epoch.

    A DistributedSampler (one rank's share under DDP), so Lightning keeps it instead of putting
    its own in. ``skip`` samples are left out of the next pass: the batches a resumed run has
    already trained on.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch through Lightning's loader state.

    Lightning restores the position in an epoch only for loaders with ``state_dict`` and
    ``load_state_dict``: here the epoch and the batches done, which the sampler skips. Worker
    seeds come from a generator seeded per epoch, not from the global RNG, so they are the same
    whether the epoch started in this process or in the one that died.
    """

    sampler: ResumableSampler

    def __init__(
        self,
        dataset: Dataset,
        sampler: ResumableSampler,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        generator = torch.Generator() if generator is None else generator
        super().__init__(dataset, sampler=sampler, generator=generator, **kwargs)
        self.batches_done = 0
        self._resume_at = 0  # batches of the epoch done before a resume

    def __iter__(self):
        self.generator.manual_seed(self.sampler.seed + self.sampler.epoch)
        self.batches_done, self._resume_at = self._resume_at, 0
        self.sampler.skip = self.batches_done * self.batch_size
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self._resume_at = state["batches_done"]


class ImageDataModule(L.LightningDataModule):
    """CIFAR-10/100, SVHN, MNIST, Fashion-MNIST, or ``fake`` (random images, for tests).

    ``num_classes``, ``in_channels``, ``image_size``, ``mean`` and ``std`` describe the data set;
    the model config reads them from here, and ``mean``/``std`` are what the model normalises with.
    ``*_subset`` options keep a seeded random part of a split, for quick runs. ``resize`` scales
    every image to ``image_size`` (after augmentation), e.g. 224 px for ImageNet-pretrained models.

    ``on_device`` holds each split as a :class:`DeviceImages` on ``self.device`` when set (a loop
    without a trainer), else on the attached trainer's device (each DDP rank its own), else on the
    CPU: the loaders then gather batches there, with no workers. Validation and test batches
    equal the normal pipeline's; training batches are drawn from the same distribution (the
    resize after a crop is torchvision's tensor resize instead of PIL's).
    ``train_set``/``val_set``/``test_set`` stay the normal per-image data sets either way.

    ``threat`` is the data set's threat model (``eps``, ``l2_eps``, ``adv_train``), unused here:
    it is a hyper-parameter so that it is saved with the checkpoint, where attack.py reads it.
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
        on_device: bool = False,
        threat: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if name not in DATASETS and name != "fake":
            known = ", ".join([*DATASETS, "fake"])
            raise ConfigError(f"unknown data set {name!r}; known: {known}")
        switches = {
            "augment": augment,
            "resize": resize,
            "download": download,
            "on_device": on_device,
        }
        for key, value in switches.items():
            if not isinstance(value, bool):  # a string like "maybe" would count as true
                raise ConfigError(f"data.{key} must be true or false, got {value!r}")
        self.save_hyperparameters(logger=False)
        self.name, self.root = name, Path(root)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.mean, self.std = list(mean), list(std)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.device: torch.device | None = None
        self._device_splits: dict[str, DeviceImages] = {}
        if on_device:  # the loaders need no workers: Lightning's advice to add some does not apply
            warnings.filterwarnings(
                "ignore", "The '.*dataloader' does not have many workers", PossibleUserWarning
            )

    def _open(self, train: bool, transform: Callable, download: bool) -> Dataset:
        if self.name == "fake":
            shape = (self.in_channels, self.image_size, self.image_size)
            items = _fake_items(
                1000 if train else 200, shape, self.num_classes, 0 if train else 10_000
            )
            return _Transformed(items, transform)
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
        to_tensor = transforms.Compose([*self._resize(), transforms.ToTensor()])
        augment = self._augment()
        train_transform = (
            transforms.Compose([*augment.transforms(), to_tensor]) if augment else to_tensor
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

    def _augment(self) -> CropFlip | None:
        spec = DATASETS.get(self.name)
        return spec.augment if spec is not None and self.hparams.augment else None

    def _resize(self) -> list[Callable]:
        return [transforms.Resize(self.image_size)] if self.hparams.resize else []

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

    def _device_split(self, split: str) -> DeviceImages:
        """The split as a DeviceImages on the gather device; read once, moved when that changes."""
        if split not in self._device_splits:
            self._device_splits[split] = self._read_uint8(split)
        if self.device is not None:
            device = self.device
        elif self.trainer is not None:
            device = self.trainer.strategy.root_device
        else:
            device = torch.device("cpu")
        return self._device_splits[split].to(device)

    def _read_uint8(self, split: str) -> DeviceImages:
        """The split's images as uint8, the normal pipeline's up to ``ToTensor``'s division.

        Training images that get cropped keep their own size; the resize follows the crop, on
        the device, as in the normal pipeline.
        """
        subset = getattr(self, f"{split}_set")
        augment = self._augment() if split == "train" else None
        resize = [] if augment else self._resize()
        to_uint8 = transforms.Compose([*resize, transforms.PILToTensor()])
        dataset = self._open(split != "test", to_uint8, download=False)
        images, labels = zip(*(dataset[i] for i in subset.indices), strict=True)
        resize_to = self.image_size if augment and self.hparams.resize else None
        return DeviceImages(torch.stack(images), torch.tensor(labels), augment, resize_to)

    def _loader(self, split: str) -> DataLoader:
        if self.hparams.on_device:
            dataset, options = self._device_split(split), {"collate_fn": _batch_as_is}
        else:
            dataset = getattr(self, f"{split}_set")
            options = {
                "num_workers": self.num_workers,
                "persistent_workers": self.num_workers > 0,
                "pin_memory": torch.cuda.is_available(),
            }
        if split != "train":
            return DataLoader(dataset, batch_size=self.batch_size, **options)
        trainer = self.trainer
        ranks = {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer else {}
        sampler = ResumableSampler(dataset, self.hparams.seed, **ranks)
        return ResumableLoader(dataset, sampler, batch_size=self.batch_size, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
