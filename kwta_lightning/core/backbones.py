"""Backbones: any torchvision or timm classifier, a small CNN or the k-WTA paper's models
(``paper_models.py``), adapted to the data, activations swapped.

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
* the activation swap: every module of the kinds ``model.swap`` lists (``SWAP_KINDS``; the default
  ``[relu]``: ``nn.ReLU``/``nn.ReLU6``), shared ones included, becomes the configured activation;
  a call of one of their functions in ``forward`` is rewritten with torch.fx into a module call.
  A model whose functional call cannot be traced, or that has none of those activations, is
  refused with the reason. Sigmoid and Hardsigmoid are never a kind: they are the gates of
  squeeze-excitation blocks (their output scales the channels), not activation sites.

A timm classifier is named ``timm/<timm name>`` (``timm_backbones.py``): timm builds it, with the
configured activation as its ``act_layer`` where it takes one, and the swap replaces what is left.

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
TIMM_PREFIX = "timm/"  # model.backbone=timm/resnet18: a timm classifier


class ModelRefused(ConfigError):
    """The backbone cannot be built as asked (unknown name, nothing to swap, untraceable...)."""


@dataclass(frozen=True)
class ActivationKind:
    """Activations the swap replaces: their module classes and their functional forms."""

    label: str  # as the log and the refusals name them
    modules: tuple[type[nn.Module], ...]
    functions: frozenset[Callable] = frozenset()  # as torch function modes and torch.fx see them
    methods: frozenset[str] = frozenset()  # Tensor methods (x.relu())


SWAP_KINDS = {
    "relu": ActivationKind(
        "ReLU",
        RELU_MODULES,
        frozenset({F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, torch.Tensor.relu})
        | {torch.Tensor.relu_},
        frozenset({"relu", "relu_"}),
    ),
    "gelu": ActivationKind("GELU", (nn.GELU,), frozenset({F.gelu})),
    "silu": ActivationKind("SiLU", (nn.SiLU,), frozenset({F.silu})),
    "hardswish": ActivationKind("Hardswish", (nn.Hardswish,), frozenset({F.hardswish})),
    "mish": ActivationKind("Mish", (nn.Mish,), frozenset({F.mish})),
    "elu": ActivationKind("ELU", (nn.ELU,), frozenset({F.elu, F.elu_})),
    "leaky_relu": ActivationKind(
        "LeakyReLU", (nn.LeakyReLU,), frozenset({F.leaky_relu, F.leaky_relu_})
    ),
}
RELU = SWAP_KINDS["relu"]
GATES = ("sigmoid", "hardsigmoid")


def swap_targets(swap: Sequence[str], backbone: str = "") -> ActivationKind:
    """The kinds ``model.swap`` names, as one; a timm ``backbone`` adds timm's own GELU classes.

    A kind that is not one of ``SWAP_KINDS`` is refused with one line naming them.
    """
    known = ", ".join(SWAP_KINDS)
    if isinstance(swap, str) or not isinstance(swap, Sequence) or not swap:
        raise ModelRefused(f"model.swap={swap}: must be a list of activation kinds ({known})")
    for kind in swap:
        if kind not in SWAP_KINDS:
            gate = " is a squeeze-excitation gate, never swapped" if kind in GATES else ""
            raise ModelRefused(f"model.swap: unknown kind {kind!r}{gate}; known: {known}")
    kinds = [SWAP_KINDS[kind] for kind in dict.fromkeys(swap)]
    modules = tuple(m for kind in kinds for m in kind.modules)
    if backbone.startswith(TIMM_PREFIX):
        from kwta_lightning.core.timm_backbones import timm_activations

        modules += tuple(m for kind in dict.fromkeys(swap) for m in timm_activations(kind))
    return ActivationKind(
        "/".join(kind.label for kind in kinds),
        modules,
        frozenset().union(*(kind.functions for kind in kinds)),
        frozenset().union(*(kind.methods for kind in kinds)),
    )


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
    if name.startswith(TIMM_PREFIX):
        from kwta_lightning.core.timm_backbones import check_timm_name

        return check_timm_name(name.removeprefix(TIMM_PREFIX))
    known = [*CUSTOM_BACKBONES, *torchvision_classifiers()]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelRefused(
            f"unknown model {name!r}{hint}: use one of {', '.join(CUSTOM_BACKBONES)}, a name "
            f"from torchvision.models.list_models(module=torchvision.models) or {TIMM_PREFIX}"
            "<a name from timm.list_models()>"
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
    if small_input:
        small_stem(model)


def small_stem(model: nn.Module) -> None:
    """The first convolution's stride set to 1, a max-pool right after the stem removed."""
    _first(model, nn.Conv2d)[1].stride = (1, 1)
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

    modules: int  # modules replaced (a shared module counts once)
    functional: int  # function calls rewritten by torch.fx
    sites: int  # places in the forward pass that now call the new activation


class _CallCounter(TorchFunctionMode):
    """Counts calls of the given functions made during a forward pass."""

    def __init__(self, functions: frozenset[Callable]) -> None:
        super().__init__()
        self.functions = functions
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.functions:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def count_calls(
    model: nn.Module,
    example: torch.Tensor,
    kinds: tuple[type, ...],
    targets: ActivationKind = RELU,
) -> tuple[int, int]:
    """Run one eval forward; return (calls of modules of ``kinds``, calls of ``targets``'
    functions)."""
    module_calls = 0

    def count(*_):
        nonlocal module_calls
        module_calls += 1

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _CallCounter(targets.functions) as counter:
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return module_calls, counter.calls


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps the given module types as single calls."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualified_name)


def _rewrite_functional_calls(
    model: nn.Module,
    new_activation: Callable[[bool], nn.Module],
    leaves: tuple[type, ...],
    targets: ActivationKind,
) -> tuple[torch.fx.GraphModule, int]:
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(model)
    graph_module = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    rewritten = 0
    for node in list(graph.nodes):
        is_target = (node.op == "call_function" and node.target in targets.functions) or (
            node.op == "call_method" and node.target in targets.methods
        )
        if not is_target:
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


def swap_activations(
    model: nn.Module,
    new_activation: Callable[[bool], nn.Module],
    example: torch.Tensor,
    model_name: str | None = None,
    targets: ActivationKind = RELU,
) -> tuple[nn.Module, SwapReport]:
    """Replace every activation of ``targets`` (``swap_targets``; default ReLU) in ``model`` with
    ``new_activation(inplace)``; return it and a report.

    ``inplace`` is the replaced module's own flag (``nn.ReLU(inplace=True)`` may overwrite its
    input, so its replacement may too; ``nn.GELU`` has none: False); a call of an activation
    function gets False.

    ``example`` is one input batch: a forward pass on it counts the call sites and finds the
    activations called as functions, which only show up when the model runs. Sites that already
    hold the new activation (a timm model's ``act_layer``) count as sites.
    """
    replacements: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, targets.modules):
            inplace = getattr(module, "inplace", False)
            new = replacements.setdefault(id(module), new_activation(inplace))
            model.set_submodule(name, new)
    kinds = tuple({type(m) for m in replacements.values()}) or (type(new_activation(False)),)
    model_name = model_name or type(model).__name__
    try:
        sites, functional_calls = count_calls(model, example, kinds, targets)
    except Exception as err:
        found = any(isinstance(m, kinds) for m in model.modules())
        none = "" if found else f" has no {targets.label} module ({_activations(model)}) and"
        raise ModelRefused(
            f"{model_name}{none} does not run on inputs of shape {tuple(example.shape)}: {err}"
        ) from err
    functional = 0
    if functional_calls:
        try:
            model, functional = _rewrite_functional_calls(model, new_activation, kinds, targets)
        except Exception as err:
            raise ModelRefused(
                f"{model_name} calls {targets.label} as a function in forward and torch.fx "
                f"cannot trace it to swap the call ({type(err).__name__}: {err})"
            ) from err
        sites, left = count_calls(model, example, kinds, targets)
        if left:
            raise ModelRefused(
                f"{model_name}: {left} functional {targets.label} calls could not be swapped"
            )
    if sites == 0:
        raise ModelRefused(
            f"{model_name} has no {targets.label} to swap ({_activations(model)}{_hint(model)})"
        )
    return model, SwapReport(modules=len(replacements), functional=functional, sites=sites)


swap_relus = swap_activations  # the name benchmarks/activation_overhead.py imports


def _activations(model: nn.Module) -> str:
    found = {type(m).__name__ for m in model.modules()}
    found &= set(torch.nn.modules.activation.__all__) - {"MultiheadAttention"}
    return f"its activations: {', '.join(sorted(found)) or 'none'}"


def _hint(model: nn.Module) -> str:
    """Which ``model.swap`` would find the model's activations, if any kind would."""
    kinds = [
        name
        for name, kind in SWAP_KINDS.items()
        if any(isinstance(m, kind.modules) for m in model.modules())
    ]
    return f"; model.swap=[{','.join(kinds)}] swaps them" if kinds else ""


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

    ``options`` (``model.backbone_options``) go to a custom backbone's constructor, or to
    ``timm.create_model`` for a timm one; ``context`` (image_size, activation, gamma,
    activation_options) goes to a custom backbone whose constructor names it, and a timm one's
    ``act_layer`` is built from it.
    """
    if options is not None and not isinstance(options, Mapping):
        raise ModelRefused(f"model.backbone_options={options}: must be a mapping of option: value")
    options = dict(options or {})
    _check_name(name)
    if name.startswith(TIMM_PREFIX):
        from kwta_lightning.core.timm_backbones import build_timm

        act_layer = None
        if context.get("activation", "relu") != "relu":
            act_layer = partial(
                make_activation,
                context["activation"],
                context["gamma"],
                options=context.get("activation_options"),
            )
        return build_timm(
            name.removeprefix(TIMM_PREFIX),
            num_classes,
            in_channels,
            small_input,
            pretrained,
            options,
            act_layer,
        )
    if name not in CUSTOM_BACKBONES:
        if options:
            raise ModelRefused(
                f"model.backbone_options={options}: {name} is a torchvision model and takes no "
                f"options (only {', '.join(CUSTOM_BACKBONES)} and {TIMM_PREFIX} models do)"
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
    swap: Sequence[str] = ("relu",),
) -> nn.Sequential:
    """Normalisation, then the backbone with ``activation`` in place of every activation of the
    kinds ``swap`` lists (``SWAP_KINDS``; the default: every ReLU).

    ``activation="relu"`` keeps the backbone exactly as torchvision (or timm) defines it.
    ``backbone_options`` are a custom backbone's options (``{"depth": 10}`` for ``wrn22``) or a
    timm model's ``create_model`` arguments, ``activation_options`` the activation's
    (``{"k": 50}`` for ``kwta_fixed``).
    """
    if {len(mean), len(std)} - {1, in_channels}:
        raise ConfigError(
            f"mean and std need {in_channels} values each (or one for every channel), "
            f"got {mean} and {std}"
        )
    new_activation = partial(make_activation, activation, gamma, options=activation_options)
    new_activation()  # fail on a bad name, gamma or option before building anything
    targets = swap_targets(swap, backbone)
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
        log.info("%s: built with %s in its own places (no swap)", backbone, activation)
    elif activation != "relu":
        example = torch.rand(1, in_channels, image_size, image_size)
        net, report = swap_activations(net, new_activation, example, backbone, targets)
        log.info(
            "%s: swapped %d %s sites (%d modules, %d functional calls) for %s",
            backbone,
            report.sites,
            targets.label,
            report.modules,
            report.functional,
            new_activation(),
        )
    return nn.Sequential(Normalize(mean, std), net)
