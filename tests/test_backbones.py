"""Backbones: built by name, adapted to the data, every activation of the kinds ``model.swap``
lists swapped (or refused with a reason), the squeeze-excitation gates left alone."""

import re

import lightning
import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

from kwta_lightning.core import backbones
from kwta_lightning.core.activations import KWTA, KWTAChannel
from kwta_lightning.core.backbones import (
    RELU,
    ActivationKind,
    ModelRefused,
    Normalize,
    SmallCNN,
    build_network,
    count_calls,
    swap_activations,
    swap_targets,
    torchvision_classifiers,
)
from kwta_lightning.core.module import KWTAClassifier

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

# The kinds that cover every activation site of torchvision's classifiers (the SE gates aside).
EVERY_KIND = ("relu", "gelu", "silu", "hardswish")
# torchvision classifiers that cannot take k-WTA on a 32 px input with EVERY_KIND, by name pattern,
# with the reason: all three are too small an input for them (ViT: 224 px; MaxViT: its windows;
# Inception v3: 75 px). The other 73 of the 80 build.
REFUSED = {r"vit_.*|maxvit_t|inception_v3": "does not run on inputs of shape"}
BUILD_WITH_KWTA = 73


def cifar_network(name: str, activation: str = "kwta", **kwargs) -> nn.Module:
    options = dict(num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    return build_network(name, activation=activation, gamma=0.1, **(options | kwargs))


def left_unswapped(net: nn.Module, example: torch.Tensor, targets: ActivationKind = RELU) -> int:
    """Modules and function calls of ``targets`` still in ``net``."""
    modules = sum(isinstance(m, targets.modules) for m in net.modules())
    return modules + count_calls(net, example, (KWTA,), targets)[1]


def check_kwta_network(name: str, swap: tuple[str, ...] = ("relu",)) -> None:
    net = cifar_network(name, swap=swap)
    x = torch.rand(2, 3, 32, 32)
    assert net(x).shape == (2, 10)
    assert left_unswapped(net, x[:1], swap_targets(swap)) == 0
    assert any(isinstance(m, KWTA) for m in net.modules())


@pytest.mark.parametrize("name", REQUIRED)
def test_required_models_take_kwta(name):
    check_kwta_network(name)


def refusal(name: str) -> str | None:
    return next((why for pattern, why in REFUSED.items() if re.fullmatch(pattern, name)), None)


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_classifiers())
def test_every_torchvision_classifier_takes_kwta_or_is_refused(name):
    if reason := refusal(name):
        with pytest.raises(ModelRefused, match=reason):
            cifar_network(name, swap=EVERY_KIND)
    else:
        check_kwta_network(name, EVERY_KIND)


def test_73_of_the_80_torchvision_classifiers_take_kwta():
    names = torchvision_classifiers()
    assert (len(names), sum(refusal(n) is None for n in names)) == (80, BUILD_WITH_KWTA)


def test_shared_relu_module_is_swapped_at_every_site():
    class TwoSites(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.relu = nn.Linear(4, 20), nn.Linear(20, 20), nn.ReLU()

        def forward(self, x):
            return self.relu(self.fc2(self.relu(self.fc1(x))))

    model, report = swap_activations(TwoSites(), lambda inplace: KWTA(0.1), torch.randn(1, 4))
    assert (report.modules, report.sites, report.functional) == (1, 2, 0)
    assert ((model(torch.randn(3, 4)) != 0).sum(dim=1) == 2).all()


def test_resnet18_counts_its_reused_relus():
    # Stem ReLU plus two calls of each of the 8 blocks' one shared ReLU.
    _, report = swap_activations(
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

    model, _ = swap_activations(Mixed(), lambda inplace: KWTA(0.2, inplace), torch.randn(1, 4))
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

    model, report = swap_activations(Functional(), lambda inplace: KWTA(0.2), torch.randn(1, 4))
    assert (report.modules, report.functional, report.sites) == (0, 2, 2)
    x = torch.randn(5, 4)
    hidden = model.fc(x)
    torch.testing.assert_close(model(x), 2 * KWTA(0.2)(hidden))


def test_untraceable_functional_relu_is_refused():
    class DataDependent(nn.Module):
        def forward(self, x):
            return torch.relu(x) if x.sum() > 0 else x

    with pytest.raises(ModelRefused, match="calls ReLU as a function.*torch.fx cannot trace"):
        swap_activations(DataDependent(), lambda inplace: KWTA(0.2), torch.ones(1, 4))


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


def test_gelu_swap_replaces_every_gelu_module():
    net = cifar_network("convnext_tiny", swap=["gelu"])
    x = torch.rand(1, 3, 32, 32)
    assert left_unswapped(net, x, swap_targets(["gelu"])) == 0
    assert sum(isinstance(m, KWTA) for m in net.modules()) == 18  # one a block


def test_silu_swap_leaves_the_squeeze_excitation_gates_alone():
    net = cifar_network("efficientnet_b0", swap=["silu"])
    blocks = [m for m in net.modules() if isinstance(m, SqueezeExcitation)]
    assert len(blocks) == 16
    assert all(isinstance(se.activation, KWTA) for se in blocks)  # the SE's inner SiLU: a site
    assert all(type(se.scale_activation) is nn.Sigmoid for se in blocks)  # its gate
    assert not any(isinstance(m, nn.SiLU) for m in net.modules())
    assert sum(isinstance(m, KWTA) for m in net.modules()) == 49


def test_default_swap_is_relu_only_and_names_the_kinds_that_would_swap_the_rest():
    net = cifar_network("mobilenet_v3_small")
    assert sum(isinstance(m, KWTA) for m in net.modules()) == 14
    assert sum(isinstance(m, nn.Hardswish) for m in net.modules()) == 19  # left, as before
    both = cifar_network("mobilenet_v3_small", swap=["relu", "hardswish"])
    assert sum(isinstance(m, KWTA) for m in both.modules()) == 33
    assert sum(isinstance(m, nn.Hardsigmoid) for m in both.modules()) == 9  # the SE gates
    with pytest.raises(ModelRefused, match=r"has no ReLU to swap .*model\.swap=\[gelu\] swaps"):
        cifar_network("convnext_tiny")


@pytest.mark.parametrize(
    ("swap", "message"),
    [
        (["relu", "swish"], "unknown kind 'swish'; known: relu, gelu, silu, hardswish, mish"),
        (["sigmoid"], "unknown kind 'sigmoid' is a squeeze-excitation gate, never swapped"),
        ("relu", r"model\.swap=relu: must be a list of activation kinds"),
    ],
)
def test_unknown_swap_kind_is_refused_in_one_line(swap, message):
    with pytest.raises(ModelRefused, match=message) as caught:
        cifar_network("cnn", swap=swap)
    assert "\n" not in str(caught.value)


class ReluAndGelu(nn.Sequential):
    """A tiny backbone with both kinds of activation."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
        )  # fmt: skip


def test_swap_travels_with_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(backbones.CUSTOM_BACKBONES, "relu_and_gelu", ReluAndGelu)
    trained = KWTAClassifier("relu_and_gelu", 10, swap=["relu", "gelu"])
    ckpt = tmp_path / "model.ckpt"
    torch.save(
        {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}, ckpt
    )
    live = KWTAClassifier("relu_and_gelu", 10)  # the default swap: the GELU stays
    assert any(isinstance(m, nn.GELU) for m in live.modules())
    live.on_load_checkpoint(torch.load(ckpt, weights_only=True))
    assert live.hparams.swap == ["relu", "gelu"]
    assert sum(isinstance(m, KWTA) for m in live.net.modules()) == 2


def test_a_checkpoint_from_before_swap_existed_loads_with_relu_swapped(tmp_path):
    old = KWTAClassifier("cnn", 10)
    hparams = {k: v for k, v in old.hparams.items() if k != "swap"}
    ckpt = tmp_path / "old.ckpt"
    version = {"pytorch-lightning_version": lightning.__version__}
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": hparams, **version}, ckpt)
    loaded = KWTAClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    assert tuple(loaded.hparams.swap) == ("relu",)
    assert sum(isinstance(m, KWTA) for m in loaded.net.modules()) == 3
