"""The k-WTA paper's architectures (model=wrn22, paper_mnist_cnn, paper_mnist_dnn): built tiny
with k-WTA and ReLU, their k-WTA layers and ratios, training through the real config, and their
options carried by the checkpoint's hyper-parameters."""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from kwta_lightning.core.activations import KWTA, KWTAChannel, kwta_layers
from kwta_lightning.core.backbones import build_network
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.core.paper_models import PaperMnistCNN, WideResNet, backbone_spec
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.console import error_line
from kwta_lightning.run.training import train
from tests.helpers import compose_train, needs_mnist

# Tiny versions of each model: (spec, input channels, image size, k-WTA layers with their gammas
# when the run's gamma is 0.1).
TINY_MODELS = {
    "wrn22": ("wrn22(depth=10, widen_factor=1)", 3, 32, [0.1] * 7),  # 2 a block, 3 blocks, 1 last
    "paper_mnist_cnn": (
        "paper_mnist_cnn(channels=[4, 4, 8, 8], hidden=32, gamma_conv=0.2, gamma_fc=0.05)",
        1,
        28,
        [0.2] * 4 + [0.05],
    ),
    "paper_mnist_dnn": ("paper_mnist_dnn(hidden=32)", 1, 28, [0.1, 0.1]),
}
# The same tiny models as config overrides
TINY_OVERRIDES = {
    "wrn22": ["model.depth=10", "model.widen_factor=1"],
    "paper_mnist_cnn": [
        "model.channels=[4,4,8,8]",
        "model.hidden=32",
        "model.gamma_conv=0.2",
        "model.gamma_fc=0.05",
    ],
    "paper_mnist_dnn": ["model.hidden=32"],
}
DATA = ["data=fake", "data.image_size=16", "data.batch_size=8", "trainer=cpu"]


def network(name: str, activation: str) -> tuple[nn.Module, torch.Tensor, list[float]]:
    spec, channels, size, gammas = TINY_MODELS[name]
    net = build_network(spec, 10, channels, size, [0.5], [0.25], activation, gamma=0.1)
    return net, torch.rand(2, channels, size, size), gammas


@pytest.mark.parametrize("name", TINY_MODELS)
def test_kwta_model_has_its_kwta_layers_with_their_gammas(name):
    net, x, gammas = network(name, "kwta")
    assert net(x).shape == (2, 10)
    layers = kwta_layers(net)
    assert all(type(layer) is KWTA for layer in layers.values())
    assert [layer.gamma for layer in layers.values()] == gammas
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())


@pytest.mark.parametrize("name", TINY_MODELS)
def test_relu_model_is_the_same_architecture_with_relus(name):
    net, x, gammas = network(name, "relu")
    kwta_net, _, _ = network(name, "kwta")
    assert net(x).shape == (2, 10)
    assert kwta_layers(net) == {}
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == len(gammas)
    assert net.state_dict().keys() == kwta_net.state_dict().keys()  # warm starts fit


def test_built_in_kwta_takes_the_configured_kind():
    spec, channels, size, _ = TINY_MODELS["paper_mnist_cnn"]
    net = build_network(spec, 10, channels, size, [0.5], [0.25], "kwta_channel", gamma=0.1)
    assert [type(m) for m in kwta_layers(net).values()] == [KWTAChannel] * 5


def test_wrn22_is_the_papers_wide_resnet():
    net = build_network("wrn22", 10, 3, 32, [0.5], [0.25], "relu")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs if m.kernel_size == (3, 3)] == [16] + [160] * 6 + [
        320
    ] * 6 + [640] * 6  # the stem, then 3 blocks of 2 convolutions a group
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 19
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    assert 26e6 < sum(p.numel() for p in net.parameters()) < 27.5e6  # WRN-22-10: 26.8M


@pytest.mark.parametrize("act", ["kwta", "relu"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_model_trains_through_its_config(tmp_path, name, act):
    cfg = compose_train(
        tmp_path, [*DATA, f"model={name}", *TINY_OVERRIDES[name], f"act={act}", "debug=fdr"]
    )
    metrics = train(cfg)
    assert 0 <= metrics["test_acc"] <= 1
    assert metrics["model"] == name and metrics["act"] == act


@needs_mnist
def test_mnist_cnn_trains_on_mnist(tmp_path):
    subsets = ["data.train_subset=64", "data.val_subset=32", "data.test_subset=32"]
    overrides = ["data=mnist", *subsets, "data.batch_size=16", "trainer=cpu", "debug=fdr"]
    model = ["model=paper_mnist_cnn", *TINY_OVERRIDES["paper_mnist_cnn"]]
    cfg = compose_train(tmp_path, [*overrides, *model])
    assert 0 <= train(cfg)["test_acc"] <= 1


@pytest.mark.parametrize("name", TINY_MODELS)
def test_config_options_reach_the_network_and_its_checkpoint(tmp_path, name):
    cfg = compose_train(tmp_path, [*DATA, f"model={name}", *TINY_OVERRIDES[name], "act=kwta"])
    model = instantiate(cfg.model)
    x = torch.rand(2, 3, 16, 16)
    gammas = TINY_MODELS[name][3]
    assert model(x).shape == (2, 10)
    assert [m.gamma for m in kwta_layers(model.net).values()] == gammas
    assert model.hparams.backbone == TINY_MODELS[name][0]
    # the hyper-parameters alone rebuild the network (as attack.py and checkpoints do)
    rebuilt = KWTAClassifier(**model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))
    # set_gamma (gamma schedules, incremental training) sees every k-WTA layer
    assert model.set_gamma(0.05) == len(gammas)
    assert {m.gamma for m in kwta_layers(model.net).values()} == {0.05}


def test_gamma_conv_and_fc_follow_the_runs_gamma_by_default(tmp_path):
    cfg = compose_train(tmp_path, [*DATA, "model=paper_mnist_cnn", "model.hidden=32", "gamma=0.3"])
    model = instantiate(cfg.model)
    assert model.hparams.backbone == "paper_mnist_cnn(hidden=32)"
    assert [m.gamma for m in kwta_layers(model.net).values()] == [0.3] * 5


def test_the_papers_defaults_leave_the_name_plain():
    options = {"depth": 22, "widen_factor": 10, "dropout": 0.0}
    assert backbone_spec("wrn22", WideResNet, options) == "wrn22"
    options = {"channels": [32, 32, 64, 64], "hidden": 20000, "gamma_conv": 0.1, "gamma_fc": 0.1}
    assert backbone_spec("paper_mnist_cnn", PaperMnistCNN, options, gamma=0.1) == "paper_mnist_cnn"


def test_bad_depth_is_a_one_line_config_error(tmp_path):
    cfg = compose_train(tmp_path, [*DATA, "model=wrn22", "model.depth=23", "debug=fdr"])
    with pytest.raises(Exception) as caught:
        train(cfg)
    line = error_line(caught.value)
    assert line.startswith("model.depth=23: must be 6n+4") and "\n" not in str(line)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("wrn22(depth=16, widen_factor=0)", "model.widen_factor=0: must be an integer >= 1"),
        ("paper_mnist_cnn(channels=[4, 4])", r"model.channels=\[4, 4\]: must be a list of 4"),
        ("paper_mnist_cnn(gamma_fc=1.5)", r"model.gamma_fc=1.5: must be a number in \(0, 1\]"),
        ("paper_mnist_dnn(hidden=0)", "model.hidden=0: must be an integer >= 1"),
        ("paper_mnist_dnn(depth=3)", "paper_mnist_dnn has no option 'depth'"),
    ],
)
def test_bad_options_name_their_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_network(spec, 10, 1, 28, [0.5], [0.25], "kwta", gamma=0.1)
