"""torchvision's ResNet v1.5 (He et al., 2016, with the bottleneck's stride on its 3x3 conv) in Flax, and the
conversion of torchvision's ImageNet weights: ResNet-18 and Wide ResNet-50-2 (Zagoruyko & Komodakis, 2016).

Module names follow torchvision's ("layer2_0/conv1" is torch's "layer2.0.conv1"), and every padding is
explicit and symmetric as in torch (Flax's "SAME" pads stride-2 convs asymmetrically), so a converted
checkpoint gives torchvision's outputs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from oat_jax.models import TorchWeights, register_model, weights

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu")
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, size: int, stride: int, name: str) -> nn.Conv:
    return nn.Conv(features, (size, size), strides=(stride, stride), padding=[(size // 2, size // 2)] * 2,
                   use_bias=False, kernel_init=_CONV_INIT, name=name)


def _norm(train: bool, name: str) -> nn.BatchNorm:
    # torch's BatchNorm2d defaults: eps 1e-5, momentum 0.1 (Flax counts the other way: 0.9). In training,
    # torch's running variance averages the unbiased batch variance, Flax's the biased one: negligible here.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv_bn(x: jax.Array, features: int, size: int, stride: int, index: int, train: bool) -> jax.Array:
    """torch's conv<index> and bn<index> of a block."""
    return _norm(train, f"bn{index}")(_conv(features, size, stride, f"conv{index}")(x))


def _shortcut(x: jax.Array, features: int, stride: int, train: bool) -> jax.Array:
    """Identity, or torch's "downsample" (1x1 conv + BN) where the block changes the shape."""
    if stride == 1 and x.shape[-1] == features:
        return x
    return _norm(train, "downsample_bn")(_conv(features, 1, stride, "downsample_conv")(x))


class _Block(nn.Module):
    """A residual block with ``planes * expansion`` output channels; its 3x3 conv takes the ``stride``."""
    planes: int
    stride: int
    width_per_group: int = 64


class BasicBlock(_Block):
    """Two 3x3 convs with BN, plus the shortcut."""
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.width_per_group != 64:
            raise ValueError("BasicBlock only supports width_per_group=64, as in torchvision")
        y = nn.relu(_conv_bn(x, self.planes, 3, self.stride, 1, train))
        y = _conv_bn(y, self.planes, 3, 1, 2, train)
        return nn.relu(y + _shortcut(x, self.planes, self.stride, train))


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (``planes * width_per_group / 64`` wide), 1x1 expand to ``4 * planes``, plus the shortcut."""
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = self.planes * self.width_per_group // 64
        out = self.planes * self.expansion
        y = nn.relu(_conv_bn(x, width, 1, 1, 1, train))
        y = nn.relu(_conv_bn(y, width, 3, self.stride, 2, train))
        y = _conv_bn(y, out, 1, 1, 3, train)
        return nn.relu(y + _shortcut(x, out, self.stride, train))


class ResNet(nn.Module):
    """Input (B, H, W, C) float images (any size, ImageNet's is 224x224); output (B, num_classes)."""
    block: Callable[..., nn.Module]
    stage_sizes: Sequence[int]
    num_classes: int
    width_per_group: int = 64

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(_norm(train, "bn1")(_conv(64, 7, 2, "conv1")(images)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                x = self.block(64 * 2 ** stage, stride, self.width_per_group,
                               name=f"layer{stage + 1}_{index}")(x, train)
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


def torch_layers(block: type, stage_sizes: Sequence[int]) -> list[weights.Layer]:
    """The layer table of torchvision's ResNet without its head ("fc"), in torchvision's order."""
    layers = [("conv1", ("conv1",), "conv"), ("bn1", ("bn1",), "batch_norm")]
    convs = 2 if block is BasicBlock else 3
    for stage, num_blocks in enumerate(stage_sizes):
        for index in range(num_blocks):
            torch_name, flax_name = f"layer{stage + 1}.{index}", f"layer{stage + 1}_{index}"
            for i in range(1, convs + 1):
                layers.append((f"{torch_name}.conv{i}", (flax_name, f"conv{i}"), "conv"))
                layers.append((f"{torch_name}.bn{i}", (flax_name, f"bn{i}"), "batch_norm"))
            if index == 0 and (stage > 0 or block.expansion != 1):  # the blocks that change the shape
                layers.append((f"{torch_name}.downsample.0", (flax_name, "downsample_conv"), "conv"))
                layers.append((f"{torch_name}.downsample.1", (flax_name, "downsample_bn"), "batch_norm"))
    return layers


def _torch_weights(block: type, stage_sizes: Sequence[int], standard_file: str) -> TorchWeights:
    body = torch_layers(block, stage_sizes)
    return TorchWeights(to_flax=functools.partial(weights.layers_to_flax, layers=body),
                        to_torch=functools.partial(weights.layers_to_torch, layers=body + [("fc", ("head",), "dense")]),
                        head_keys=("fc.weight", "fc.bias"), standard_file=standard_file)


def _no_dropout(name: str, dropout_rate: float) -> None:
    if dropout_rate:
        raise ValueError(f"{name} has no dropout; leave dropout_rate at 0")


@register_model("resnet18", torch_weights=_torch_weights(BasicBlock, (2, 2, 2, 2), "resnet18-f37072fd.pth"))
def resnet18(num_classes: int, dropout_rate: float = 0.0) -> nn.Module:
    """torchvision's resnet18: BasicBlocks [2, 2, 2, 2]."""
    _no_dropout("resnet18", dropout_rate)
    return ResNet(block=BasicBlock, stage_sizes=(2, 2, 2, 2), num_classes=num_classes)


@register_model("wide_resnet50_2",
                torch_weights=_torch_weights(Bottleneck, (3, 4, 6, 3), "wide_resnet50_2-95faca4d.pth"))
def wide_resnet50_2(num_classes: int, dropout_rate: float = 0.0) -> nn.Module:
    """torchvision's wide_resnet50_2: Bottlenecks [3, 4, 6, 3] with 3x3 convs twice as wide as ResNet-50's."""
    _no_dropout("wide_resnet50_2", dropout_rate)
    return ResNet(block=Bottleneck, stage_sizes=(3, 4, 6, 3), num_classes=num_classes, width_per_group=128)
