"""timm classifiers as backbones: ``model.backbone=timm/<name>`` (any name of
``timm.list_models()``, a pretrained tag included: ``timm/resnet18.a1_in1k``).

``timm.create_model`` builds the model with ``num_classes``, ``in_chans`` (timm sums pretrained
RGB filters for one channel) and ``pretrained`` (timm's own loading: the Hugging Face hub, or a
local file with ``+model.backbone_options.pretrained_cfg_overlay.file=<path>``);
``model.backbone_options`` are more of its arguments (``drop_path_rate``, ``img_size``...).

The activation: where the model takes ``act_layer``, the configured activation is passed as it
(timm builds every site it configures with it, calling it with or without ``inplace=``); the swap
then replaces what timm builds another way (blocks that name their own activation, the ReLU inside
a squeeze-excitation block). A model that takes no ``act_layer`` gets the swap alone. The gates
(Sigmoid, Hardsigmoid) are left alone either way.

``small_input``: every model gets the torchvision rule (first convolution's stride 1, a max-pool
right after the stem removed); a timm ResNet also loses its stem max-pool after a deep stem
(``resnet10t``: three convolutions, then the pool). Unlike a torchvision ResNet's, a timm ResNet's
stem keeps its convolutions, so their pretrained weights still fit.
"""

import difflib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import timm
from timm.layers import GELU, GELUTanh, QuickGELU
from timm.models.resnet import ResNet
from torch import nn

from kwta_lightning.core.backbones import TIMM_PREFIX, ModelRefused, small_stem

log = logging.getLogger(__name__)

# timm's own classes of a swap kind (the others are torch's)
TIMM_ACTIVATIONS: dict[str, tuple[type[nn.Module], ...]] = {"gelu": (GELU, GELUTanh, QuickGELU)}


def timm_activations(kind: str) -> tuple[type[nn.Module], ...]:
    """The timm module classes the swap kind ``kind`` replaces besides torch's."""
    return TIMM_ACTIVATIONS.get(kind, ())


def check_timm_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(TIMM_PREFIX + c for c in close)}?)" if close else ""
        raise ModelRefused(
            f"unknown timm model {name!r}{hint}: use {TIMM_PREFIX}<a name from timm.list_models()>"
        )


def build_timm(
    name: str,
    num_classes: int,
    in_channels: int,
    small_input: bool,
    pretrained: bool,
    options: Mapping[str, Any],
    act_layer: Callable[..., nn.Module] | None,
) -> nn.Module:
    """timm's ``name``, with ``act_layer`` where it takes one, adapted to small inputs."""
    arguments = {
        **options,
        "pretrained": pretrained,
        "num_classes": num_classes,
        "in_chans": in_channels,
    }
    if act_layer is not None:
        arguments["act_layer"] = act_layer
    model = _create(name, arguments)
    if act_layer is not None and (
        built := sum(isinstance(m, type(act_layer())) for m in model.modules())
    ):
        log.info("timm %s: %d %s modules built as its act_layer", name, built, act_layer())
    if small_input:
        if isinstance(model, ResNet):
            model.maxpool = nn.Identity()
        small_stem(model)
    return model


def _create(name: str, arguments: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, **arguments)
    except TypeError as err:
        if "act_layer" in arguments and "'act_layer'" in str(err):
            log.info("timm %s takes no act_layer: the swap replaces its activations", name)
            return _create(name, {k: v for k, v in arguments.items() if k != "act_layer"})
        raise _refused(name, arguments, err) from err
    except Exception as err:  # timm's builders and loaders raise many types
        raise _refused(name, arguments, err) from err


def _refused(name: str, arguments: Mapping[str, Any], err: Exception) -> ModelRefused:
    message = " ".join(str(err).split())
    local = ""
    if arguments["pretrained"]:
        local = (
            " (pretrained weights come from the Hugging Face hub; a local file: "
            "+model.backbone_options.pretrained_cfg_overlay.file=<path>)"
        )
    return ModelRefused(f"timm cannot build {name}: {type(err).__name__}: {message}{local}")
