"""Backbones: built by name, adapted to the data, every ReLU swapped (or refused with a reason)."""

import re

import pytest
import torch
from torch import nn

from kwta_lightning.core.activations import KWTA, KWTAChannel
from kwta_lightning.core.backbones import (
    ModelRefused,
    Normalize,
    SmallCNN,
    build_network,
    count_calls,
    swap_relus,
    torchvision_classifiers,
)

REQUIRED = [
    "cnn",
    "resnet18",
    "resnet34",
    "resnet50",
    "alexnet",
    "vgg16_bn",
    "densenet121",
    "wide_resnet50_2",
    "mobilenet_v2",
]

# torchvision classifiers that cannot take k-WTA on a 32 px input, by name pattern, with the reason.
REFUSED = {
    r"convnext_.*|efficientnet_.*|swin_[tsb]": "has no ReLU to swap",  # GELU / SiLU only
    r"vit_.*": "has no ReLU module",  # GELU, and needs 224 px
    r"maxvit_t|inception_v3": "does not run on inputs of shape",  # too small an input
}


def cifar_network(name: str, activation: str = "kwta", **kwargs) -> nn.Module:
    options = dict(num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    return build_network(name, activation=activation, gamma=0.1, **(options | kwargs))


def relus_left(net: nn.Module, example: torch.Tensor) -> int:
    modules = sum(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in net.modules())
    return modules + count_calls(net, example, (KWTA,))[1]


def check_kwta_network(name: str) -> None:
    net = cifar_network(name)
    x = torch.rand(2, 3, 32, 32)
    assert net(x).shape == (2, 10)
    assert relus_left(net, x[:1]) == 0
    assert any(isinstance(m, KWTA) for m in net.modules())


@pytest.mark.parametrize("name", REQUIRED)
def test_required_models_take_kwta(name):
    check_kwta_network(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_classifiers())
def test_every_torchvision_classifier_takes_kwta_or_is_refused(name):
    reasons = [reason for pattern, reason in REFUSED.items() if re.fullmatch(pattern, name)]
    if reasons:
        with pytest.raises(ModelRefused, match=reasons[0]):
            cifar_network(name)
    else:
        check_kwta_network(name)


def test_shared_relu_module_is_swapped_at_every_site():
    class TwoSites(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.relu = nn.Linear(4, 20), nn.Linear(20, 20), nn.ReLU()

        def forward(self, x):
            return self.relu(self.fc2(self.relu(self.fc1(x))))

    model, report = swap_relus(TwoSites(), lambda inplace: KWTA(0.1), torch.randn(1, 4))
    assert (report.modules, report.sites, report.functional) == (1, 2, 0)
    assert ((model(torch.randn(3, 4)) != 0).sum(dim=1) == 2).all()


def test_resnet18_counts_its_reused_relus():
    # Stem ReLU plus two calls of each of the 8 blocks' one shared ReLU.
    _, report = swap_relus(
        cifar_network("resnet18", activation="relu")[1],
        lambda inplace: KWTA(0.1),
        torch.rand(1, 3, 32, 32),
    )
    assert (report.modules, report.sites, report.functional) == (9, 17, 0)


def test_swapped_kwta_is_inplace_where_the_relu_was():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.inplace, self.copy = nn.Linear(4, 20), nn.ReLU(inplace=True), nn.ReLU()

        def forward(self, x):
            return self.copy(self.inplace(self.fc(x))) + torch.relu(self.fc(x))

    model, _ = swap_relus(Mixed(), lambda inplace: KWTA(0.2, inplace), torch.randn(1, 4))
    assert model.inplace.inplace and not model.copy.inplace
    assert not model.functional_act_0.inplace  # a functional call never had the flag
    resnet = cifar_network("resnet18")
    assert all(m.inplace for m in resnet.modules() if isinstance(m, KWTA))  # torchvision's are


def test_functional_relu_is_rewritten_with_fx():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return torch.nn.functional.relu(self.fc(x)) + self.fc(x).relu()

    model, report = swap_relus(Functional(), lambda inplace: KWTA(0.2), torch.randn(1, 4))
    assert (report.modules, report.functional, report.sites) == (0, 2, 2)
    x = torch.randn(5, 4)
    hidden = model.fc(x)
    torch.testing.assert_close(model(x), 2 * KWTA(0.2)(hidden))


def test_untraceable_functional_relu_is_refused():
    class DataDependent(nn.Module):
        def forward(self, x):
            return torch.relu(x) if x.sum() > 0 else x

    with pytest.raises(ModelRefused, match="calls ReLU as a function.*torch.fx cannot trace"):
        swap_relus(DataDependent(), lambda inplace: KWTA(0.2), torch.ones(1, 4))


def test_densenet_final_functional_relu_is_swapped():
    net = cifar_network("densenet121")
    assert sum(isinstance(m, KWTA) for m in net.modules()) == 121  # 120 modules + 1 rewritten call


def test_small_input_stem_and_one_channel():
    resnet = cifar_network("resnet18", in_channels=1, image_size=28, mean=[0.1], std=[0.3])[1]
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert resnet.conv1.in_channels == 1
    assert isinstance(resnet.maxpool, nn.Identity)
    alexnet = cifar_network("alexnet")[1]
    assert alexnet.features[0].stride == (1, 1)
    assert isinstance(alexnet.features[2], nn.Identity)
    full_size = cifar_network("resnet18", small_input=False, image_size=64)[1]
    assert full_size.conv1.stride == (2, 2) and isinstance(full_size.maxpool, nn.MaxPool2d)


def test_normalisation_is_the_first_layer():
    net = cifar_network("cnn", activation="kwta_channel")
    assert isinstance(net[0], Normalize)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(net[0](x), (x - 0.5) / 0.25)
    assert any(isinstance(m, KWTAChannel) for m in net.modules())


def test_relu_keeps_the_backbone_as_torchvision_defines_it():
    net = cifar_network("mobilenet_v2", activation="relu")
    assert sum(isinstance(m, nn.ReLU6) for m in net.modules()) == 35


def test_unknown_model_names_the_closest_ones():
    with pytest.raises(ModelRefused, match="unknown model 'resnet19'.*resnet18"):
        cifar_network("resnet19")


def test_pretrained_weights_come_through_torchvision_weights_api(tmp_path, monkeypatch):
    # Put a weights file where torchvision's cache would hold it, so nothing is downloaded.
    import torchvision

    weights = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT
    reference = torchvision.models.squeezenet1_1().state_dict()
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(reference, hub / "checkpoints" / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    net = cifar_network("squeezenet1_1", pretrained=True)[1]
    torch.testing.assert_close(
        net.features[3].squeeze.weight, reference["features.3.squeeze.weight"]
    )
    assert net.classifier[1].out_channels == 10  # the 1000-class head was replaced
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_a_small_cnn_checkpoint_from_before_its_layers_had_names_still_loads():
    torch.manual_seed(0)
    trained = SmallCNN()
    names = [name for name, _ in trained.named_children()]
    numbered = {}
    for key, value in trained.state_dict().items():
        name, rest = key.split(".", 1)
        numbered[f"{names.index(name)}.{rest}"] = value
    assert "0.weight" in numbered and "conv1.weight" not in numbered
    loaded = SmallCNN()
    loaded.load_state_dict(numbered)  # strict: every key found its layer
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
