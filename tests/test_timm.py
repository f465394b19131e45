"""timm backbones: built by name with k-WTA at every activation site (the gates left alone),
trained through the real CLI, pretrained weights from a local file. Never touches the network."""

import json

import huggingface_hub
import pytest
import timm
import torch
from torch import nn

from kwta_lightning.core.activations import KWTA, kwta_layers
from kwta_lightning.core.backbones import (
    SWAP_KINDS,
    ModelRefused,
    build_network,
    count_calls,
    swap_targets,
)
from kwta_lightning.core.module import KWTAClassifier
from tests.helpers import cli_env, run_cli

EVERY_KIND = swap_targets(list(SWAP_KINDS), "timm/")  # every activation, timm's classes too
GATES = (nn.Sigmoid, nn.Hardsigmoid)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def timm_network(name: str, activation: str = "kwta", **kwargs) -> nn.Sequential:
    options = dict(num_classes=10, in_channels=3, image_size=32, mean=[0.5], std=[0.25])
    return build_network(f"timm/{name}", activation=activation, gamma=0.1, **options | kwargs)


@pytest.mark.parametrize(
    ("name", "options", "sites", "gates"),
    [
        ("resnet10t", {}, 11, 0),  # act_layer builds every one
        ("mobilenetv3_small_050", {}, 33, 9),  # act_layer, then the swap: ReLU blocks, SE ReLUs
        ("test_convnext", {}, 9, 0),  # act_layer in place of timm's GELUTanh
        ("test_vit", {"small_input": False, "backbone_options": {"img_size": 32}}, 6, 0),
        ("ghostnet_050", {}, 42, 7),  # takes no act_layer: the swap alone
    ],
)
def test_tiny_timm_models_take_kwta_at_every_activation_site(name, options, sites, gates):
    net = timm_network(name, **options)
    x = torch.rand(2, 3, 32, 32)
    net(x).sum().backward()
    assert sum(isinstance(m, KWTA) for m in net.modules()) == sites
    assert not any(isinstance(m, EVERY_KIND.modules) for m in net.modules())
    assert count_calls(net, x[:1], (KWTA,), EVERY_KIND)[1] == 0  # no functional one either
    assert sum(isinstance(m, GATES) for m in net.modules()) == gates


def test_relu_keeps_the_timm_model_as_timm_defines_it():
    net = timm_network("mobilenetv3_small_050", activation="relu")
    assert not any(isinstance(m, KWTA) for m in net.modules())
    assert sum(isinstance(m, nn.Hardswish) for m in net.modules()) == 19


def test_small_input_keeps_a_timm_resnet_stem_at_stride_one_without_its_pool():
    resnet = timm_network("resnet10t")[1]
    assert resnet.conv1[0].stride == (1, 1) and isinstance(resnet.maxpool, nn.Identity)
    full_size = timm_network("resnet10t", small_input=False)[1]
    assert full_size.conv1[0].stride == (2, 2) and isinstance(full_size.maxpool, nn.MaxPool2d)


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    reference = timm.create_model("resnet10t")  # ImageNet's 1000 classes, 3 channels
    weights = tmp_path / "resnet10t.pth"
    torch.save(reference.state_dict(), weights)
    local = {"pretrained_cfg_overlay": {"file": str(weights)}}
    net = timm_network("resnet10t", pretrained=True, backbone_options=local)[1]
    torch.testing.assert_close(net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    torch.testing.assert_close(net.conv1[0].weight, reference.conv1[0].weight)  # stem kept
    assert net.fc.out_features == 10  # timm's head for the data's classes
    grey = timm_network("resnet10t", pretrained=True, backbone_options=local, in_channels=1)[1]
    torch.testing.assert_close(grey.conv1[0].weight, reference.conv1[0].weight.sum(1, True))


def test_pretrained_weights_without_network_are_refused_naming_the_local_file():
    with pytest.raises(ModelRefused, match="pretrained_cfg_overlay.file=<path>") as caught:
        timm_network("resnet10t", pretrained=True)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("resnet10", {}, r"unknown timm model 'resnet10' \(did you mean timm/resnet10t"),
        ("resnet10t", {"depth": 3}, "unexpected keyword argument 'depth'"),
    ],
)
def test_bad_timm_names_and_options_are_refused_in_one_line(name, options, message):
    with pytest.raises(ModelRefused, match=message) as caught:
        timm_network(name, backbone_options=options)
    assert "\n" not in str(caught.value)


def test_a_timm_model_trains_through_the_cli_and_its_checkpoint_rebuilds_it(tmp_path):
    model = ["model=timm", "model.backbone=timm/mobilenetv3_small_050", "act=kwta"]
    steps = ["data=fake", "data.batch_size=16", "trainer=cpu", "debug=limit"]
    steps += ["trainer.max_epochs=1", "trainer.limit_train_batches=3"]
    steps += ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "logger=csv"]
    result = run_cli(*model, *steps, f"hydra.run.dir={tmp_path}", env=cli_env(HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    swapped = "timm/mobilenetv3_small_050: swapped 33 ReLU sites (14 modules, 0 functional calls)"
    assert swapped in (tmp_path / "train.log").read_text()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rebuilt = KWTAClassifier.load_from_checkpoint(metrics["ckpt_best"], map_location="cpu")
    assert rebuilt.hparams.backbone == "timm/mobilenetv3_small_050"
    assert rebuilt.hparams.swap == ["relu"]
    assert len(kwta_layers(rebuilt.net)) == 33
