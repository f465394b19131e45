"""The robustness community's CIFAR architectures, as RobustBench defines them.

Custom backbones of ``core/backbones.py``, so that k-WTA results compare directly with
RobustBench's leaderboard:

* :class:`PreActResNet18` (``model=preact_resnet18``): RobustBench's ``PreActResNet18()``
  (``resnet.py``): a 3x3 stem convolution to 64 channels, four stages of two pre-activation basic
  blocks (BN-ReLU-conv3x3, BN-ReLU-conv3x3) with 64, 128, 256 and 512 channels (strides 1, 2, 2,
  2), global average pooling and the classifier ``linear``; no BN-ReLU before the pooling,
  convolutions without bias, PyTorch's initialisation. 11,171,146 parameters on CIFAR-10.
* :class:`WideResNet` (``model=wrn28_10``, ``model=wrn34_10``): RobustBench's ``WideResNet``
  (``wide_resnet.py``, from the TRADES code): a 3x3 stem convolution to 16 channels, three groups
  of (depth - 4) / 6 pre-activation basic blocks with 16k, 32k and 64k channels (strides 1, 2, 2),
  BN-ReLU, global average pooling and the classifier ``fc`` (with bias); the WRN initialisation.
  WRN-28-10: 36,479,194 parameters on CIFAR-10, WRN-34-10: 46,160,474.

Every ReLU is an ``nn.ReLU`` module (RobustBench's PreActResNet calls ``F.relu``), so ``act=kwta``
swaps every site, as for any torchvision model: 16 in PreActResNet-18 (17 with ``bn_before_fc``),
25 in WRN-28-10, 31 in WRN-34-10.

The parameter and buffer names are RobustBench's, so a state dict of those architectures, as
RobustBench's loader gives it, loads into the backbone with ``load_state_dict`` (strict): a
``KWTAClassifier``'s ``net[1]``, behind the data set's normalisation, with k-WTA or ReLU. This
holds for ``WideResNet(depth, widen_factor)`` (its ``sub_block1``, a group that RobustBench
builds for some checkpoints and never runs, is dropped on loading), for
``PreActResNet(PreActBlock, [2, 2, 2, 2])`` and, with ``bn_before_fc`` and ``preact_shortcut``,
for ``PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)``. The model zoo's subclasses
that normalise inside the model keep their mean and std as ``mu`` and ``sigma`` buffers: leave
those out and give the values as ``model.mean`` and ``model.std``. The names and shapes are
tested against RobustBench's definitions, not against its published weights.

What differs from RobustBench: any number of input channels (RobustBench: 3); global average
pooling over whatever is left (RobustBench pools 4x4 and 8x8, the same on 32 px); the
PreActResNet's ``width`` option (base channels, 64) for small runs; no ``bias_last`` option (the
classifier always has its bias, RobustBench's default). None of these changes a name or, at the
defaults on CIFAR, a number.
"""

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from kwta_lightning.core.paper_models import OPTION, check_count, init_wide_resnet, wrn_blocks
from kwta_lightning.errors import ConfigError


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{OPTION}.{key}={value}: must be true or false")
    return value


def _conv3x3(in_planes: int, out_planes: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut.

    When the shape changes, the shortcut is a 1x1 convolution (``shortcut.0``) of the block's
    input, as RobustBench's ``PreActBlock``; ``preact_shortcut`` gives it the pre-activated input
    instead, as its ``PreActBlockV2`` (the same names).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, preact_shortcut: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1)
        same = stride == 1 and in_planes == planes
        conv = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        self.shortcut = None if same else nn.Sequential(conv)
        self.preact_shortcut = preact_shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre if self.preact_shortcut else x)
        return self.conv2(self.relu2(self.bn2(self.conv1(pre)))) + shortcut


class PreActResNet18(nn.Sequential):
    """PreActResNet-18 for 32 px images, as RobustBench's ``PreActResNet18()``.

    ``width``: channels of the first stage (RobustBench: 64), doubled at each of the next three.
    ``bn_before_fc``: BN-ReLU before the pooling (RobustBench's option, off in
    ``PreActResNet18()``). ``preact_shortcut``: the shortcut convolutions take the pre-activated
    input (RobustBench's ``PreActBlockV2``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
        bn_before_fc: bool = False,
        preact_shortcut: bool = False,
    ) -> None:
        check_count("width", width, 1)
        _flag("bn_before_fc", bn_before_fc)
        _flag("preact_shortcut", preact_shortcut)
        widths = [width, width, 2 * width, 4 * width, 8 * width]
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv1=_conv3x3(in_channels, width, 1))
        for stage, stride in enumerate((1, 2, 2, 2), start=1):
            layers[f"layer{stage}"] = nn.Sequential(
                PreActBlock(widths[stage - 1], widths[stage], stride, preact_shortcut),
                PreActBlock(widths[stage], widths[stage], 1, preact_shortcut),
            )
        if bn_before_fc:
            layers.update(bn=nn.BatchNorm2d(widths[4]), relu=nn.ReLU(inplace=True))
        layers.update(
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            linear=nn.Linear(widths[4], num_classes),
        )
        super().__init__(layers)


class WideBasicBlock(nn.Module):
    """RobustBench's WRN basic block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the shortcut.

    When the channel count changes, the shortcut is a 1x1 convolution (``convShortcut``) of the
    pre-activated input; otherwise it is the input itself.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(out_planes, out_planes, 1)
        same = in_planes == out_planes
        self.convShortcut = (
            None if same else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(pre)))))
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class WideResNet(nn.Sequential):
    """WRN-``depth``-``widen_factor`` for 32 px images, as RobustBench's ``WideResNet``.

    ``dropout``: between a block's two convolutions (RobustBench's ``dropRate``, 0 on its
    leaderboard's WRNs).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        blocks = wrn_blocks(depth, widen_factor, dropout)
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv1=_conv3x3(in_channels, widths[0], 1))
        for group, stride in enumerate((1, 2, 2), start=1):
            group_blocks = nn.Sequential(
                *(
                    WideBasicBlock(
                        widths[group - 1] if i == 0 else widths[group],
                        widths[group],
                        stride if i == 0 else 1,
                        dropout,
                    )
                    for i in range(blocks)
                )
            )
            # RobustBench's NetworkBlock keeps its blocks under ``layer``: block1.layer.0...
            layers[f"block{group}"] = nn.Sequential(OrderedDict(layer=group_blocks))
        layers.update(
            bn1=nn.BatchNorm2d(widths[3]),
            relu=nn.ReLU(inplace=True),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(widths[3], num_classes),
        )
        super().__init__(layers)
        init_wide_resnet(self)
        self.register_load_state_dict_pre_hook(_drop_sub_block1)


def _drop_sub_block1(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """RobustBench's ``sub_block1=True`` checkpoints hold a group its forward never runs."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}sub_block1.")]:
        del state_dict[key]


ROBUST_MODELS: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": PreActResNet18,
    "wrn28_10": WideResNet,
    "wrn34_10": partial(WideResNet, depth=34),
}
