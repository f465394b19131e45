"""The k-WTA paper's own architectures, custom backbones of ``core/backbones.py``.

* :class:`WideResNet`: WRN-d-k of Zagoruyko & Komodakis (2016), the paper's CIFAR WideResNet-22-10
  (``model=wrn22``): pre-activation basic blocks, plain ``nn.ReLU`` modules that the backbone swap
  turns into the configured activation like any torchvision model's.
* :class:`PaperMnistCNN` (``model=paper_mnist_cnn``) and :class:`PaperMnistDNN`
  (``model=paper_mnist_dnn``): the paper's MNIST networks, which have k-WTA built in. They build
  the configured activation themselves (``make_activation``: the project's k-WTA layers, or
  ``nn.ReLU`` with ``act=relu`` for the ReLU baseline of the same architecture), so the swap
  leaves them alone; the CNN has separate sparsity ratios for its convolutional and its fully
  connected k-WTA layers (the paper's ``sp1`` and ``sp2``).

A constructor's arguments other than ``in_channels``, ``num_classes``, ``image_size``,
``activation``, ``gamma`` and ``activation_options`` (which ``build_network`` gives) are the model
config's ``model.backbone_options`` (``model.backbone_options.depth=10``); their error messages
name them so.
"""

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from kwta_lightning.core.activations import check_gamma, make_activation
from kwta_lightning.errors import ConfigError

OPTION = "model.backbone_options"  # where a config sets a custom backbone's options


def check_count(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{OPTION}.{key}={value}: must be an integer >= {low}")
    return value


def wrn_blocks(depth: Any, widen_factor: Any, dropout: Any) -> int:
    """Check a WideResNet's options; return its blocks a group, (depth - 4) / 6."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or depth % 6 != 4:
        raise ConfigError(
            f"{OPTION}.depth={depth}: must be 6n+4, n >= 1 blocks a group (10, 16, 22, 28, ...)"
        )
    check_count("widen_factor", widen_factor, 1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"{OPTION}.dropout={dropout}: must be a number in [0, 1)")
    return (depth - 4) // 6


def init_wide_resnet(model: nn.Module) -> None:
    """The WRN code's initialisation: He-normal convolutions (fan-out), BN weight 1 and bias 0,
    zero classifier bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _ratio(key: str, value: Any) -> float:
    try:
        return check_gamma(value)
    except ConfigError:
        raise ConfigError(f"{OPTION}.{key}={value}: must be a number in (0, 1]") from None


class _PreActBlock(nn.Module):
    """WRN basic block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the shortcut.

    When the shape changes, the shortcut is a 1x1 convolution of the pre-activated input (as in
    the WRN paper's and the k-WTA paper's code); otherwise it is the input itself.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.act2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, padding=1, bias=False)
        same = in_planes == out_planes and stride == 1
        self.shortcut = None if same else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.dropout(self.act2(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Sequential):
    """WRN-``depth``-``widen_factor`` for 32 px images (Zagoruyko & Komodakis 2016).

    A 3x3 stem convolution to 16 channels, three groups of (depth - 4) / 6 pre-activation basic
    blocks with 16k, 32k and 64k channels (strides 1, 2, 2), BN-ReLU, global average pooling and
    the classifier. WRN-22-10: 3 blocks a group, channels 16/160/320/640, 19 ReLUs (two a block,
    one after the last BN), every one an ``nn.ReLU`` module for the swap to k-WTA.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        depth: int = 22,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        blocks = wrn_blocks(depth, widen_factor, dropout)
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
        )
        for group, stride in enumerate((1, 2, 2), start=1):
            layers[f"block{group}"] = nn.Sequential(
                *(
                    _PreActBlock(
                        widths[group - 1] if i == 0 else widths[group],
                        widths[group],
                        stride if i == 0 else 1,
                        dropout,
                    )
                    for i in range(blocks)
                )
            )
        layers.update(
            bn=nn.BatchNorm2d(widths[3]),
            act=nn.ReLU(inplace=True),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(widths[3], num_classes),
        )
        super().__init__(layers)
        init_wide_resnet(self)


def _conv_output_size(size: int) -> int:
    """Side of a 3x3, padding 1, stride 2 convolution's output."""
    return (size + 1) // 2


class PaperMnistCNN(nn.Sequential):
    """The k-WTA paper's MNIST CNN: four 3x3 convolutions, a wide fully connected layer, the head.

    Channels ``channels`` (the paper's 32/32/64/64), the 2nd and 4th with stride 2 (no pooling),
    each followed by k-WTA with ratio ``gamma_conv`` (the paper's ``sp1``); then a fully
    connected layer of ``hidden`` units (the paper's 20,000) followed by k-WTA with ratio
    ``gamma_fc`` (``sp2``), then the linear classifier. Biases everywhere, no batch norm,
    PyTorch's initialisation: as the paper's code. ``activation="relu"`` puts ReLUs in the same
    places (its ReLU baseline).
    ``gamma_conv`` and ``gamma_fc`` of None (the default) are ``gamma``: those layers follow it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        activation: str = "kwta",
        gamma: float = 0.1,
        activation_options: Mapping[str, Any] | None = None,
        channels: Sequence[int] = (32, 32, 64, 64),
        hidden: int = 20000,
        gamma_conv: float | None = None,
        gamma_fc: float | None = None,
    ) -> None:
        if not isinstance(channels, Sequence) or len(channels) != 4:
            raise ConfigError(f"{OPTION}.channels={channels}: must be a list of 4 channel counts")
        for c in channels:
            check_count("channels", c, 1)
        check_count("hidden", hidden, 1)
        gamma_conv = _ratio("gamma_conv", gamma if gamma_conv is None else gamma_conv)
        gamma_fc = _ratio("gamma_fc", gamma if gamma_fc is None else gamma_fc)
        size = _conv_output_size(_conv_output_size(image_size))
        widths = [in_channels, *channels]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, stride in enumerate((1, 2, 1, 2), start=1):
            layers[f"conv{i}"] = nn.Conv2d(widths[i - 1], widths[i], 3, stride, padding=1)
            layers[f"act{i}"] = make_activation(activation, gamma_conv, True, activation_options)
        layers.update(
            flatten=nn.Flatten(),
            fc1=nn.Linear(channels[3] * size * size, hidden),
            act5=make_activation(activation, gamma_fc, True, activation_options),
            fc2=nn.Linear(hidden, num_classes),
        )
        super().__init__(layers)


class PaperMnistDNN(nn.Sequential):
    """The k-WTA paper's MNIST DNN: ``hidden_layers`` fully connected layers of ``hidden`` units,
    each followed by k-WTA with ratio ``gamma``, then the linear classifier.

    The paper's code: two hidden layers of equal width (its k-WTA sweeps: 1,000 to 10,000 units),
    one sparsity ratio, weights drawn from N(0, 1/fan_in) and zero biases. ``activation="relu"``
    puts ReLUs in the same places (its ReLU baseline).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        activation: str = "kwta",
        gamma: float = 0.1,
        activation_options: Mapping[str, Any] | None = None,
        hidden: int = 10000,
        hidden_layers: int = 2,
    ) -> None:
        check_count("hidden", hidden, 1)
        check_count("hidden_layers", hidden_layers, 1)
        gamma = check_gamma(gamma)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        features = in_channels * image_size * image_size
        for i in range(1, hidden_layers + 1):
            layers[f"fc{i}"] = nn.Linear(features, hidden)
            layers[f"act{i}"] = make_activation(activation, gamma, True, activation_options)
            features = hidden
        layers[f"fc{hidden_layers + 1}"] = nn.Linear(features, num_classes)
        super().__init__(layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, m.in_features**-0.5)
                nn.init.zeros_(m.bias)


PAPER_MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn22": WideResNet,
    "paper_mnist_cnn": PaperMnistCNN,
    "paper_mnist_dnn": PaperMnistDNN,
}
