"""Backbones: any torchvision classifier, a small CNN or the k-WTA paper's models
(``paper_models.py``), adapted to the data, ReLUs swapped.

The network a LightningModule trains is ``Sequential(normalize, backbone)``: normalisation by the
data set's mean and std is the first layer, so every model takes pixels in [0, 1].

Adaptations, in order:

* ``num_classes``: the classifier head is built (or, with pretrained weights, replaced) for it.
* ``in_channels``: the first convolution takes that many channels; with pretrained weights and one
  channel its filters are summed over RGB (a grey image seen as three equal channels).
* ``small_input`` (28-32 px images): the ResNet family gets the CIFAR stem of the k-WTA paper
  (3x3 stride-1 first convolution, no max-pool); every other model gets its first convolution's
  stride set to 1 and a max-pool that directly follows the stem (before the second convolution)
  removed. Both keep 4x more resolution through the network than the ImageNet stem.
* the activation swap: every ``nn.ReLU``/``nn.ReLU6`` module, shared ones included, becomes the
  configured activation; a ReLU called as a function in ``forward`` is rewritten with torch.fx
  into a module call. A model whose functional ReLU cannot be traced, or that has no ReLU at all, is
  refused with the reason.

A custom backbone (``CUSTOM_BACKBONES``) is built by its constructor with ``in_channels`` and
``num_classes``, whichever of ``image_size``, ``activation`` and ``gamma`` it names, and the
model's ``backbone_options`` (a plain dict, ``model.backbone_options.depth=10``: its other
arguments, see :func:`options_of`); an option the constructor does not take, or options for a
torchvision model, are refused. A custom backbone whose constructor names ``activation`` builds
its activation sites itself (the paper's MNIST models, with k-WTA built in): the swap leaves it
alone.
"""

import difflib
import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from kwta_lightning.core.activations import make_activation
from kwta_lightning.core.paper_models import PAPER_MODELS
from kwta_lightning.core.robust_models import ROBUST_MODELS
from kwta_lightning.errors import ConfigError

log = logging.getLogger(__name__)

RELU_MODULES = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS = {F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, torch.Tensor.relu}
RELU_FUNCTIONS.add(torch.Tensor.relu_)
RELU_METHODS = {"relu", "relu_"}


class ModelRefused(ConfigError):
    """The backbone cannot be built as asked (unknown name, no ReLU to swap, untraceable...)."""


class Normalize(nn.Module):
    """Per-channel (x - mean) / std on pixels in [0, 1]; one value serves every channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Sequential):
    """Two conv blocks and a two-layer head: a fast model for MNIST-sized work.

    Its ReLUs follow batch norms and run in place, as torchvision's do (so the k-WTA layers
    swapped in for them do too).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        layers = OrderedDict(
            conv1=nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(width),
            act1=nn.ReLU(inplace=True),  # act*: the sites k-WTA is swapped into
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            bn2=nn.BatchNorm2d(2 * width),
            act2=nn.ReLU(inplace=True),
            pool2=nn.MaxPool2d(2),
            pool=nn.AdaptiveAvgPool2d(4),
            flatten=nn.Flatten(),
            fc1=nn.Linear(2 * width * 16, 4 * width, bias=False),
            bn3=nn.BatchNorm1d(4 * width),
            act3=nn.ReLU(inplace=True),
            fc2=nn.Linear(4 * width, num_classes),
        )
        super().__init__(layers)
        self.register_load_state_dict_pre_hook(_numbered_to_named)


def _numbered_to_named(module: nn.Sequential, state_dict: dict, prefix: str, *_: Any) -> None:
    """Checkpoints written before SmallCNN's layers had names keyed them by position."""
    for index, (name, _) in enumerate(module.named_children()):
        numbered = f"{prefix}{index}."
        for key in [k for k in state_dict if k.startswith(numbered)]:
            state_dict[f"{prefix}{name}.{key[len(numbered) :]}"] = state_dict.pop(key)


CUSTOM_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    **PAPER_MODELS,
    **ROBUST_MODELS,
}
# What build_network gives a custom backbone (those its constructor names); the rest are options.
BUILT_IN = ("in_channels", "num_classes", "image_size", "activation", "gamma", "activation_options")


def options_of(name: str) -> dict[str, Any]:
    """The options the custom backbone ``name`` takes (``model.backbone_options``), with their
    defaults: its constructor's arguments other than ``BUILT_IN``."""
    return {
        key: p.default
        for key, p in inspect.signature(CUSTOM_BACKBONES[name]).parameters.items()
        if key not in BUILT_IN and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _takes(name: str, argument: str) -> bool:
    return argument in inspect.signature(CUSTOM_BACKBONES[name]).parameters


def torchvision_classifiers() -> list[str]:
    """Names of every classification model in torchvision.models."""
    return torchvision.models.list_models(module=torchvision.models)


def _check_name(name: str) -> None:
    known = [*CUSTOM_BACKBONES, *torchvision_classifiers()]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelRefused(
            f"unknown model {name!r}{hint}: use one of {', '.join(CUSTOM_BACKBONES)} or a name "
            "from torchvision.models.list_models(module=torchvision.models)"
        )


def _first(model: nn.Module, kind: type[nn.Module]) -> tuple[str, nn.Module]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, kind))


def _load_torchvision(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    extra = (
        {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    )
    if not pretrained:
        return torchvision.models.get_model(name, num_classes=num_classes, **extra)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as err:  # download failures surface as several exception types
        raise ModelRefused(
            f"could not load torchvision's pretrained weights {weights} for {name}: {err} "
            f"(they are cached under {torch.hub.get_dir()})"
        ) from err
    _replace_head(model, len(weights.meta["categories"]), num_classes)
    return model


def _replace_head(model: nn.Module, old_classes: int, num_classes: int) -> None:
    """Rebuild every layer that outputs the pretrained class count (main and auxiliary heads)."""
    if old_classes == num_classes:
        return
    heads = [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == old_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == old_classes)
    ]
    for name, layer in heads:
        if isinstance(layer, nn.Linear):
            new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
        else:
            new = nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, layer.stride)
        model.set_submodule(name, new)


def _adapt_stem(model: nn.Module, in_channels: int, small_input: bool) -> None:
    if isinstance(model, torchvision.models.ResNet) and small_input:
        out = model.conv1.out_channels
        model.conv1 = nn.Conv2d(in_channels, out, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return
    conv_name, conv = _first(model, nn.Conv2d)
    if in_channels != conv.in_channels:
        new = nn.Conv2d(
            in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        if in_channels == 1:
            with torch.no_grad():
                new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
        model.set_submodule(conv_name, new)
        conv = new
    if small_input:
        conv.stride = (1, 1)
        _remove_stem_pool(model)


def _remove_stem_pool(model: nn.Module) -> None:
    """Replace a max-pool that comes before the second convolution with nn.Identity."""
    convs_seen = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            convs_seen += 1
            if convs_seen == 2:
                return
        elif isinstance(module, nn.MaxPool2d):
            model.set_submodule(name, nn.Identity())
            return


@dataclass
class SwapReport:
    """Where the activation swap put the new activation."""

    modules: int  # ReLU modules replaced (a shared module counts once)
    functional: int  # ReLU function calls rewritten by torch.fx
    sites: int  # places in the forward pass that now call the new activation


class _CallCounter(TorchFunctionMode):
    """Counts ReLU function calls made during a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.relu_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in RELU_FUNCTIONS:
            self.relu_calls += 1
        return func(*args, **(kwargs or {}))


def count_calls(
    model: nn.Module, example: torch.Tensor, kinds: tuple[type, ...]
) -> tuple[int, int]:
    """Run one eval forward; return (calls of modules of ``kinds``, ReLU function calls)."""
    module_calls = 0

    def count(*_):
        nonlocal module_calls
        module_calls += 1

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _CallCounter() as counter:
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return module_calls, counter.relu_calls


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps the given module types as single calls."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualified_name)


def _rewrite_functional_relus(
    model: nn.Module, new_activation: Callable[[bool], nn.Module], leaves: tuple[type, ...]
) -> tuple[torch.fx.GraphModule, int]:
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(model)
    graph_module = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    rewritten = 0
    for node in list(graph.nodes):
        is_relu = (node.op == "call_function" and node.target in RELU_FUNCTIONS) or (
            node.op == "call_method" and node.target in RELU_METHODS
        )
        if not is_relu:
            continue
        name = f"functional_act_{rewritten}"
        graph_module.add_submodule(name, new_activation(False))
        with graph.inserting_after(node):
            call = graph.call_module(name, args=(node.args[0],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        rewritten += 1
    graph.lint()
    graph_module.recompile()
    return graph_module, rewritten


def swap_relus(
    model: nn.Module,
    new_activation: Callable[[bool], nn.Module],
    example: torch.Tensor,
    model_name: str | None = None,
) -> tuple[nn.Module, SwapReport]:
    """Replace every ReLU of ``model`` with ``new_activation(inplace)``; return it and a report.

    ``inplace`` is the replaced module's own flag (``nn.ReLU(inplace=True)`` may overwrite its
    input, so its replacement may too); a ReLU called as a function gets False.

    ``example`` is one input batch: a forward pass on it counts the call sites and finds ReLUs
    called as functions, which only show up when the model runs.
    """
    replacements: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, RELU_MODULES):
            new = replacements.setdefault(id(module), new_activation(module.inplace))
            model.set_submodule(name, new)
    kinds = tuple({type(m) for m in replacements.values()}) or (type(new_activation(False)),)
    model_name = model_name or type(model).__name__
    try:
        sites, functional_calls = count_calls(model, example, kinds)
    except Exception as err:
        no_relu = "" if replacements else f" has no ReLU module ({_activations(model)}) and"
        raise ModelRefused(
            f"{model_name}{no_relu} does not run on inputs of shape {tuple(example.shape)}: {err}"
        ) from err
    functional = 0
    if functional_calls:
        try:
            model, functional = _rewrite_functional_relus(model, new_activation, kinds)
        except Exception as err:
            raise ModelRefused(
                f"{model_name} calls ReLU as a function in forward and torch.fx cannot trace it "
                f"to swap the call ({type(err).__name__}: {err})"
            ) from err
        sites, left = count_calls(model, example, kinds)
        if left:
            raise ModelRefused(f"{model_name}: {left} functional ReLU calls could not be swapped")
    if sites == 0:
        raise ModelRefused(f"{model_name} has no ReLU to swap ({_activations(model)})")
    return model, SwapReport(modules=len(replacements), functional=functional, sites=sites)


def _activations(model: nn.Module) -> str:
    found = {type(m).__name__ for m in model.modules()}
    found &= set(torch.nn.modules.activation.__all__) - {"MultiheadAttention"}
    return f"its activations: {', '.join(sorted(found)) or 'none'}"


def builds_own_activation(name: str) -> bool:
    """Whether the backbone ``name`` puts the activation in itself (its constructor takes it)."""
    return name in CUSTOM_BACKBONES and _takes(name, "activation")


def build_backbone(
    name: str,
    num_classes: int,
    in_channels: int,
    small_input: bool,
    pretrained: bool,
    options: Mapping[str, Any] | None = None,
    **context: Any,
) -> nn.Module:
    """The named backbone, adapted to the class count, channel count and image size.

    ``options`` (``model.backbone_options``) go to a custom backbone's constructor; ``context``
    (image_size, activation, gamma, activation_options) goes to a custom backbone whose
    constructor names it.
    """
    if options is not None and not isinstance(options, Mapping):
        raise ModelRefused(f"model.backbone_options={options}: must be a mapping of option: value")
    options = dict(options or {})
    _check_name(name)
    if name not in CUSTOM_BACKBONES:
        if options:
            raise ModelRefused(
                f"model.backbone_options={options}: {name} is a torchvision model and takes no "
                f"options (only {', '.join(CUSTOM_BACKBONES)} do)"
            )
    else:
        if pretrained:
            raise ModelRefused(f"model {name!r} has no pretrained weights")
        known = options_of(name)
        if unknown := [key for key in options if key not in known]:
            raise ModelRefused(
                f"model.backbone_options.{unknown[0]}: {name} has no option {unknown[0]!r} "
                f"(its options: {', '.join(known) or 'none'})"
            )
        given = {key: value for key, value in context.items() if _takes(name, key)}
        factory = CUSTOM_BACKBONES[name]
        return factory(in_channels=in_channels, num_classes=num_classes, **given, **options)
    model = _load_torchvision(name, num_classes, pretrained)
    _adapt_stem(model, in_channels, small_input)
    return model


def build_network(
    backbone: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    activation: str = "kwta",
    gamma: float = 0.1,
    small_input: bool = True,
    pretrained: bool = False,
    backbone_options: Mapping[str, Any] | None = None,
    activation_options: Mapping[str, Any] | None = None,
) -> nn.Sequential:
    """Normalisation, then the backbone with ``activation`` in place of every ReLU.

    ``activation="relu"`` keeps the backbone exactly as torchvision defines it.
    ``backbone_options`` are a custom backbone's options (``{"depth": 10}`` for ``wrn22``),
    ``activation_options`` the activation's (``{"k": 50}`` for ``kwta_fixed``).
    """
    if {len(mean), len(std)} - {1, in_channels}:
        raise ConfigError(
            f"mean and std need {in_channels} values each (or one for every channel), "
            f"got {mean} and {std}"
        )
    new_activation = partial(make_activation, activation, gamma, options=activation_options)
    new_activation()  # fail on a bad name, gamma or option before building anything
    net = build_backbone(
        backbone,
        num_classes,
        in_channels,
        small_input,
        pretrained,
        backbone_options,
        image_size=image_size,
        activation=activation,
        gamma=gamma,
        activation_options=activation_options,
    )
    if activation != "relu" and builds_own_activation(backbone):
        log.info("%s: built with %s in its own places (no ReLU swap)", backbone, activation)
    elif activation != "relu":
        example = torch.rand(1, in_channels, image_size, image_size)
        net, report = swap_relus(net, new_activation, example, backbone)
        log.info(
            "%s: swapped %d ReLU sites (%d modules, %d functional calls) for %s",
            backbone,
            report.sites,
            report.modules,
            report.functional,
            new_activation(),
        )
    return nn.Sequential(Normalize(mean, std), net)
