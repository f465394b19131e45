"""The k-WTA paper's architectures (model=wrn22, paper_mnist_cnn, paper_mnist_dnn): built tiny
with k-WTA and ReLU, their k-WTA layers and ratios, training through the real config, and their
options (model.backbone_options) carried by the checkpoint's hyper-parameters."""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from kwta_lightning.core.activations import KWTA, KWTAChannel, kwta_layers
from kwta_lightning.core.backbones import build_network, options_of
from kwta_lightning.core.module import KWTAClassifier
from kwta_lightning.errors import ConfigError
from kwta_lightning.run.console import error_line
from kwta_lightning.run.training import train
from tests.helpers import compose_train, needs_mnist

# Tiny versions of each model: (backbone options, input channels, image size, k-WTA layers with
# their gammas when the run's gamma is 0.1).
TINY_MODELS = {
    "wrn22": ({"depth": 10, "widen_factor": 1}, 3, 32, [0.1] * 7),  # 2 a block, 3 blocks, 1 last
    "paper_mnist_cnn": (
        {"channels": [4, 4, 8, 8], "hidden": 32, "gamma_conv": 0.2, "gamma_fc": 0.05},
        1,
        28,
        [0.2] * 4 + [0.05],
    ),
    "paper_mnist_dnn": ({"hidden": 32}, 1, 28, [0.1, 0.1]),
}
# The same tiny models as config overrides
TINY_OVERRIDES = {
    name: [f"model.backbone_options.{key}={value}" for key, value in options.items()]
    for name, (options, *_) in TINY_MODELS.items()
}
DATA = ["data=fake", "data.image_size=16", "data.batch_size=8", "trainer=cpu"]


def network(name: str, activation: str) -> tuple[nn.Module, torch.Tensor, list[float]]:
    options, channels, size, gammas = TINY_MODELS[name]
    net = build_network(
        name, 10, channels, size, [0.5], [0.25], activation, 0.1, backbone_options=options
    )
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
    options, channels, size, _ = TINY_MODELS["paper_mnist_cnn"]
    args = ("paper_mnist_cnn", 10, channels, size, [0.5], [0.25], "kwta_channel", 0.1)
    net = build_network(*args, backbone_options=options)
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
    assert model.hparams.backbone == name
    assert model.hparams.backbone_options == options_of(name) | TINY_MODELS[name][0]
    # the hyper-parameters alone rebuild the network (as attack.py and checkpoints do)
    rebuilt = KWTAClassifier(**model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))
    # so does loading a checkpoint of another activation into a live module
    relu = KWTAClassifier(**(model.hparams | {"activation": "relu"}))
    relu.on_load_checkpoint({"hyper_parameters": dict(model.hparams)})
    relu.load_state_dict(model.state_dict())
    assert relu.eval()(x).equal(model(x))
    # set_gamma (gamma schedules, incremental training) sees every k-WTA layer
    assert model.set_gamma(0.05) == len(gammas)
    assert {m.gamma for m in kwta_layers(model.net).values()} == {0.05}


def test_gamma_conv_and_fc_follow_the_runs_gamma_by_default(tmp_path):
    overrides = [*DATA, "model=paper_mnist_cnn", "model.backbone_options.hidden=32", "gamma=0.3"]
    model = instantiate(compose_train(tmp_path, overrides).model)
    assert model.hparams.backbone_options["gamma_conv"] is None
    assert model.hparams.backbone_options["gamma_fc"] is None
    assert [m.gamma for m in kwta_layers(model.net).values()] == [0.3] * 5


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_configs_defaults_are_the_papers(tmp_path, name):
    """The config's backbone_options are the constructor's defaults (the paper's models)."""
    cfg = compose_train(tmp_path, [f"model={name}"])
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in options_of(name).items()}
    assert cfg.model.backbone_options == defaults


def test_every_model_config_has_backbone_options(tmp_path):
    cfg = compose_train(tmp_path, ["model=resnet18"])
    assert cfg.model.backbone_options is None


def test_checkpoints_without_backbone_options_still_load():
    model = KWTAClassifier("cnn", 10, 1, 16, [0.5], [0.25])
    saved = {k: v for k, v in model.hparams.items() if k != "backbone_options"}  # an old one
    rebuilt = KWTAClassifier(**saved)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.hparams.backbone_options is None


def test_bad_depth_is_a_one_line_config_error(tmp_path):
    overrides = [*DATA, "model=wrn22", "model.backbone_options.depth=23", "debug=fdr"]
    with pytest.raises(Exception) as caught:
        train(compose_train(tmp_path, overrides))
    line = error_line(caught.value)
    assert line.startswith("model.backbone_options.depth=23: must be 6n+4")
    assert "\n" not in str(line)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("wrn22", {"depth": 16, "widen_factor": 0}, r"\.widen_factor=0: must be an integer >= 1"),
        ("paper_mnist_cnn", {"channels": [4, 4]}, r"\.channels=\[4, 4\]: must be a list of 4"),
        ("paper_mnist_cnn", {"gamma_fc": 1.5}, r"\.gamma_fc=1.5: must be a number in \(0, 1\]"),
        ("paper_mnist_dnn", {"hidden": 0}, r"\.hidden=0: must be an integer >= 1"),
        ("paper_mnist_dnn", {"depth": 3}, "paper_mnist_dnn has no option 'depth'"),
        ("paper_mnist_dnn", {"gamma": 0.2}, "paper_mnist_dnn has no option 'gamma'"),
        ("resnet18", {"depth": 3}, "resnet18 is a torchvision model and takes no options"),
    ],
)
def test_bad_options_name_their_key(name, options, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_network(name, 10, 1, 28, [0.5], [0.25], "kwta", 0.1, backbone_options=options)
    assert str(caught.value).startswith("model.backbone_options")
    assert "\n" not in str(caught.value)


def test_unknown_option_is_refused_through_the_config(tmp_path):
    overrides = [*DATA, "model=wrn22", "+model.backbone_options.width=3", "debug=fdr"]
    with pytest.raises(Exception) as caught:
        train(compose_train(tmp_path, overrides))
    line = error_line(caught.value)
    assert line.startswith("model.backbone_options.width: wrn22 has no option 'width' (its ")
    assert "\n" not in str(line)
