"""RobustBench's CIFAR architectures (model=preact_resnet18, wrn28_10, wrn34_10): their names,
shapes and parameter counts against RobustBench's definitions, RobustBench state dicts loading,
every ReLU site swapped for k-WTA, and training through the real CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from kwta_lightning.core.activations import KWTA, kwta_layers
from kwta_lightning.core.backbones import build_network, count_calls, options_of
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.core.robust_models import ROBUST_MODELS, PreActBlock, WideBasicBlock
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.validation import check_values
from tests.helpers import compose_train, run_cli

Spec = dict[str, tuple[int, ...]]  # a state dict's names and shapes, in order

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bn(name: str, channels: int) -> Spec:
    entries = ("weight", "bias", "running_mean", "running_var")
    return {f"{name}.{e}": (channels,) for e in entries} | {f"{name}.num_batches_tracked": ()}


def conv(name: str, in_planes: int, out_planes: int, size: int) -> Spec:
    return {f"{name}.weight": (out_planes, in_planes, size, size)}


def linear(name: str, features: int, classes: int) -> Spec:
    return {f"{name}.weight": (classes, features), f"{name}.bias": (classes,)}


def robustbench_preact_resnet18(bn_before_fc: bool = False, width: int = 64) -> Spec:
    """RobustBench's PreActResNet(PreActBlock or PreActBlockV2, [2, 2, 2, 2], bn_before_fc) on
    CIFAR-10, written from its resnet.py; its channels are width 64, the others are for tests."""
    spec = conv("conv1", 3, width, 3)
    in_planes = width
    for stage, planes in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
        for i, stride in enumerate((1 if stage == 1 else 2, 1)):
            block = f"layer{stage}.{i}"
            spec |= bn(f"{block}.bn1", in_planes) | conv(f"{block}.conv1", in_planes, planes, 3)
            spec |= bn(f"{block}.bn2", planes) | conv(f"{block}.conv2", planes, planes, 3)
            if stride != 1 or in_planes != planes:
                spec |= conv(f"{block}.shortcut.0", in_planes, planes, 1)
            in_planes = planes
    if bn_before_fc:
        spec |= bn("bn", 8 * width)
    return spec | linear("linear", 8 * width, 10)


def robustbench_wide_resnet(depth: int, widen_factor: int, sub_block1: bool = False) -> Spec:
    """RobustBench's WideResNet(depth, 10, widen_factor, sub_block1) on CIFAR-10, written from its
    wide_resnet.py (sub_block1: a copy of block1's shapes that its forward never runs)."""
    blocks = (depth - 4) // 6
    channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    groups = [("block1", 16, channels[1])]
    groups += [("sub_block1", 16, channels[1])] if sub_block1 else []
    groups += [("block2", channels[1], channels[2]), ("block3", channels[2], channels[3])]
    spec = conv("conv1", 3, 16, 3)
    for group, in_planes, out_planes in groups:
        for i in range(blocks):
            block, planes = f"{group}.layer.{i}", in_planes if i == 0 else out_planes
            spec |= bn(f"{block}.bn1", planes) | conv(f"{block}.conv1", planes, out_planes, 3)
            spec |= bn(f"{block}.bn2", out_planes) | conv(
                f"{block}.conv2", out_planes, out_planes, 3
            )
            if planes != out_planes:
                spec |= conv(f"{block}.convShortcut", planes, out_planes, 1)
    return spec | bn("bn1", channels[3]) | linear("fc", channels[3], 10)


def parameter_count(spec: Spec) -> int:
    return sum(math.prod(shape) for key, shape in spec.items() if not key.endswith(BN_BUFFERS))


def state_dict_of(spec: Spec) -> dict[str, torch.Tensor]:
    """Random values of RobustBench's names and shapes (positive, so they make valid BN stats)."""
    return {
        key: torch.tensor(3) if key.endswith("num_batches_tracked") else torch.rand(shape) + 0.5
        for key, shape in spec.items()
    }


def network(tmp_path: Path, overrides: list[str]) -> nn.Module:
    """The network train.py builds from these overrides."""
    cfg = compose_train(tmp_path, overrides)
    check_values(cfg)
    return instantiate(cfg.model).net


# (model, options, RobustBench's names and shapes, parameter count on CIFAR-10)
ARCHITECTURES = {
    "preact_resnet18": ("preact_resnet18", {}, robustbench_preact_resnet18(), 11_171_146),
    "preact_resnet18_v2": (
        "preact_resnet18",
        {"bn_before_fc": True, "preact_shortcut": True},
        robustbench_preact_resnet18(bn_before_fc=True),
        11_172_170,
    ),
    "wrn28_10": ("wrn28_10", {}, robustbench_wide_resnet(28, 10), 36_479_194),
    "wrn34_10": ("wrn34_10", {}, robustbench_wide_resnet(34, 10), 46_160_474),
}
SITES = {"preact_resnet18": 16, "wrn28_10": 25, "wrn34_10": 31}  # ReLU calls in a forward
# The same depths with the fewest channels (the same ReLU sites), for quick runs
NARROW = {
    "preact_resnet18": "model.backbone_options.width=4",
    "wrn28_10": "model.backbone_options.widen_factor=1",
    "wrn34_10": "model.backbone_options.widen_factor=1",
}
DATA = ["data=fake", "data.batch_size=16", "trainer=cpu"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_names_shapes_and_parameter_count_are_robustbenchs(architecture):
    name, options, spec, count = ARCHITECTURES[architecture]
    backbone = ROBUST_MODELS[name](**options)
    assert [(k, tuple(v.shape)) for k, v in backbone.state_dict().items()] == list(spec.items())
    assert parameter_count(spec) == count
    assert sum(p.numel() for p in backbone.parameters()) == count


@pytest.mark.parametrize(
    ("name", "options", "spec"),
    [
        ("preact_resnet18", {"width": 4}, robustbench_preact_resnet18(width=4)),
        (
            "preact_resnet18",
            {"width": 4, "bn_before_fc": True},
            robustbench_preact_resnet18(True, 4),
        ),
        ("wrn28_10", {"depth": 10, "widen_factor": 1}, robustbench_wide_resnet(10, 1, True)),
    ],
)
def test_a_robustbench_state_dict_loads_into_the_kwta_network(name, options, spec):
    net = build_network(name, 10, 3, 32, [0.5], [0.25], "kwta", 0.1, backbone_options=options)
    state = state_dict_of(spec)
    net[1].load_state_dict(state)  # strict: every name and shape fits
    assert all(torch.equal(v, state[k]) for k, v in net[1].state_dict().items())
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("size", ["narrow", pytest.param("full", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", SITES)
def test_builds_with_kwta_and_relu_and_every_relu_site_becomes_kwta(tmp_path, name, size):
    model = [f"model={name}", *([NARROW[name]] if size == "narrow" else [])]
    nets = {act: network(tmp_path, [*DATA, *model, f"act={act}"]) for act in ("relu", "kwta")}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert nets["kwta"](x).shape == (2, 10)
    sites = SITES[name]
    assert count_calls(nets["relu"], x[:1], (nn.ReLU,)) == (sites, sites)  # every one a module's
    assert count_calls(nets["kwta"], x[:1], (KWTA,)) == (sites, 0)  # every one swapped
    assert not any(isinstance(m, nn.ReLU) for m in nets["kwta"].modules())
    assert [m.gamma for m in kwta_layers(nets["kwta"]).values()] == [0.1] * sites
    assert nets["relu"].state_dict().keys() == nets["kwta"].state_dict().keys()  # warm starts


def test_the_options_change_the_preact_resnet_as_robustbenchs_do():
    options = {"width": 4, "bn_before_fc": True, "preact_shortcut": True}
    net = build_network(
        "preact_resnet18", 10, 1, 28, [0.5], [0.25], "kwta", 0.1, False, False, options
    )
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert len(kwta_layers(net)) == SITES["preact_resnet18"] + 1  # BN-ReLU before the pooling
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)][:2] == [4, 4]


@pytest.mark.parametrize("preact_shortcut", [False, True])
def test_preact_block_order_is_robustbenchs(preact_shortcut):
    block = PreActBlock(4, 8, 2, preact_shortcut).eval()
    x = torch.randn(2, 4, 8, 8)
    pre = F.relu(block.bn1(x))
    residual = block.conv2(F.relu(block.bn2(block.conv1(pre))))
    expected = residual + block.shortcut(pre if preact_shortcut else x)  # V2: pre-activated
    assert torch.allclose(block(x), expected)


@pytest.mark.parametrize(("in_planes", "stride"), [(4, 2), (8, 1)])
def test_wide_block_order_is_robustbenchs(in_planes, stride):
    block = WideBasicBlock(in_planes, 8, stride, 0.0).eval()
    x = torch.randn(2, in_planes, 8, 8)
    pre = F.relu(block.bn1(x))
    residual = block.conv2(F.relu(block.bn2(block.conv1(pre))))
    shortcut = x if block.convShortcut is None else block.convShortcut(pre)
    assert (block.convShortcut is None) == (in_planes == 8)
    assert torch.allclose(block(x), residual + shortcut)


@pytest.mark.parametrize("name", SITES)
def test_the_configs_defaults_are_robustbenchs(tmp_path, name):
    """The config's backbone_options are the constructor's defaults (RobustBench's models)."""
    assert compose_train(tmp_path, [f"model={name}"]).model.backbone_options == options_of(name)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("preact_resnet18", {"width": 0}, r"\.width=0: must be an integer >= 1"),
        ("preact_resnet18", {"bn_before_fc": 1}, r"\.bn_before_fc=1: must be true or false"),
        ("wrn34_10", {"depth": 33}, r"\.depth=33: must be 6n\+4"),
        ("wrn28_10", {"dropout": 1.0}, r"\.dropout=1.0: must be a number in \[0, 1\)"),
        ("wrn28_10", {"sub_block1": True}, "wrn28_10 has no option 'sub_block1'"),
    ],
)
def test_bad_options_name_their_key(name, options, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_network(name, 10, 3, 32, [0.5], [0.25], "kwta", 0.1, backbone_options=options)
    assert str(caught.value).startswith("model.backbone_options")


def test_preact_resnet18_trains_through_the_cli_and_its_checkpoint_rebuilds_it(tmp_path):
    model = ["model=preact_resnet18", "model.backbone_options.width=4", "act=kwta", "gamma=0.1"]
    steps = ["debug=limit", "trainer.max_epochs=1", "trainer.limit_train_batches=3"]
    steps += ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "logger=csv"]
    result = run_cli(*model, *DATA, *steps, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "preact_resnet18" and metrics["act"] == "kwta"
    swapped = "preact_resnet18: swapped 16 ReLU sites (16 modules, 0 functional calls)"
    assert swapped in (tmp_path / "train.log").read_text()
    rebuilt = KWTAClassifier.load_from_checkpoint(metrics["ckpt_best"], map_location="cpu")
    assert rebuilt.hparams.backbone_options == options_of("preact_resnet18") | {"width": 4}
    assert len(kwta_layers(rebuilt.net)) == 16
