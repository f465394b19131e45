"""data.on_device: the normal pipeline's batches; crop and flip drawn like torchvision's."""

import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler
from torchvision.transforms import functional as TF

from kwta_lightning.core import data as data_module
from kwta_lightning.core.data import CropFlip, DatasetSpec, ImageDataModule
from tests.helpers import MNIST_ROOT, compose_train, needs_mnist, run_cli

FAKE = {"name": "fake", "val_size": 200, "num_workers": 0, "batch_size": 64}
MNIST = {"name": "mnist", "root": str(MNIST_ROOT), "in_channels": 1, "image_size": 28}
MNIST |= {"num_workers": 0, "download": False, "val_subset": 300, "test_subset": 300}


def loaders(options: dict, split: str) -> tuple:
    """The normal and the on-device loader of one split, over the same data module options."""
    modules = [ImageDataModule(**options, on_device=on) for on in (False, True)]
    for module in modules:
        module.setup()
    return tuple(getattr(module, f"{split}_dataloader")() for module in modules)


def crops_and_flips(image: torch.Tensor, augment: CropFlip) -> torch.Tensor:
    """Every image torchvision's RandomCrop(size, padding) + RandomHorizontalFlip can make."""
    padded = TF.pad(image, augment.padding)
    room = padded.shape[-1] - augment.size + 1
    corners = [(top, left) for top in range(room) for left in range(room)]
    crops = [TF.crop(padded, top, left, augment.size, augment.size) for top, left in corners]
    return torch.stack([*crops, *(TF.hflip(crop) for crop in crops)])


@pytest.mark.parametrize(
    "options",
    [
        FAKE,
        FAKE | {"val_subset": 50, "test_subset": 70},
        pytest.param(MNIST, marks=needs_mnist),
        pytest.param(MNIST | {"image_size": 32, "resize": True}, marks=needs_mnist),
    ],
    ids=["fake", "fake-subsets", "mnist", "mnist-resized"],
)
@pytest.mark.parametrize("split", ["val", "test"])
def test_on_device_val_and_test_batches_equal_the_normal_pipeline(options, split):
    normal, on_device = loaders(options, split)
    assert len(normal) == len(on_device)
    for (x, y), (x_dev, y_dev) in zip(normal, on_device, strict=True):
        assert torch.equal(x_dev, x) and torch.equal(y_dev, y)
        assert x_dev.dtype == torch.float32 and y_dev.dtype == torch.int64


def test_device_crop_flip_draws_every_torchvision_outcome_evenly():
    augment = CropFlip(8, padding=2)
    image = torch.arange(1, 3 * 8 * 8 + 1).reshape(3, 8, 8).to(torch.uint8)  # distinct pixels
    outcomes = crops_and_flips(image, augment)  # 25 crops, then the same 25 flipped
    torch.manual_seed(0)
    out = augment.batch(image.expand(5000, -1, -1, -1))
    assert out.shape == (5000, 3, 8, 8) and out.dtype == torch.uint8
    matches = (out[:, None] == outcomes[None]).flatten(2).all(dim=2)
    assert torch.equal(matches.sum(dim=1), torch.ones(5000, dtype=torch.long)), "not a crop/flip"
    counts = matches.sum(dim=0)
    assert counts[25:].sum().item() == pytest.approx(2500, abs=150)  # flipped: about half
    per_offset = counts[:25] + counts[25:]
    assert per_offset.min() > 120 and per_offset.max() < 280  # 200 expected for each offset


def test_on_device_train_batches_are_cropped_and_flipped_with_their_labels(monkeypatch):
    augment = CropFlip(16, padding=4)  # the fake data set augmented like CIFAR, at 16 px
    monkeypatch.setitem(data_module.DATASETS, "fake", DatasetSpec(None, "", augment))
    options = FAKE | {"image_size": 16, "batch_size": 8}
    plain = ImageDataModule(**options, augment=False)
    plain.setup()
    module = ImageDataModule(**options, on_device=True)
    module.setup()
    torch.manual_seed(0)
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1
    sources = torch.stack([plain.train_set[i][0] for i in range(len(plain.train_set))])
    labels = torch.tensor([plain.train_set[i][1] for i in range(len(plain.train_set))])
    found = []
    for image, label in zip(x, y, strict=True):  # each image is one crop/flip of an image
        candidates = sources[labels == label]  # of its own label
        outcomes = torch.cat([crops_and_flips(source, augment) for source in candidates])
        hits = (outcomes == image).flatten(1).all(dim=1).nonzero().flatten()
        assert len(hits) >= 1, "an image that is no crop/flip of a training image of its label"
        found.append(hits[0].item() % 162)  # which of the 81 offsets x 2 flips
    assert len(set(found)) > 1, "every image cropped and flipped the same way"


def test_each_ddp_rank_gathers_its_own_shard():
    module = ImageDataModule(**FAKE, on_device=True)
    module.setup()
    loader = module.train_dataloader()
    shards = []
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, seed=0)
        shards.append(torch.cat([x for x, _ in _update_dataloader(loader, sampler)]))
    assert len(shards[0]) == len(shards[1]) == 400
    together = torch.cat(shards).flatten(1)
    assert len(torch.unique(together, dim=0)) == 800  # every training image once, on one rank


def test_on_device_composes_from_the_data_config(tmp_path):
    cfg = compose_train(tmp_path, ["data=fake", "data.on_device=true"])
    assert cfg.data.on_device is True
    assert compose_train(tmp_path, ["data=cifar10"]).data.on_device is False


@pytest.mark.slow
def test_train_cli_with_data_on_device(tmp_path):
    result = run_cli(
        "data=fake",
        "data.on_device=true",
        "model=cnn",
        "act=kwta",
        "logger=csv",
        "trainer.max_epochs=1",
        "data.train_subset=64",
        "data.batch_size=32",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "metrics.json").is_file()
