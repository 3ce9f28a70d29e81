"""WRN-28-10 for 32x32 images (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016), as the paper's
CIFAR-10 experiments use it.

WRN-d-k: a 3x3 conv with 16 filters, then three groups of (d - 4) / 6 pre-activation blocks with 16k, 32k and
64k channels (the last two groups start with stride 2), then BN-ReLU, global average pooling and the head.
A block is BN-ReLU-conv3x3, BN-ReLU, dropout, conv3x3, added to its input; where the block changes the shape
the shortcut is a 1x1 conv of the pre-activated input. No conv has a bias: each is followed by a BatchNorm.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from oat_jax.models import register_model

_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He et al.'s init, as the paper uses


def _conv3x3(features: int, stride: int = 1) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=False,
                   kernel_init=_CONV_INIT)


def _norm_relu(x: jax.Array, train: bool) -> jax.Array:
    return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))


class WideBlock(nn.Module):
    """A pre-activation block with dropout between its two 3x3 convs."""
    features: int
    stride: int
    dropout_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        activated = _norm_relu(x, train)
        y = _conv3x3(self.features, self.stride)(activated)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(_norm_relu(y, train))
        y = _conv3x3(self.features)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=(self.stride, self.stride), use_bias=False,
                        kernel_init=_CONV_INIT, name="shortcut")(activated)
        return x + y


class WideResNet(nn.Module):
    """WRN-depth-widen_factor. Input (B, H, W, C) float images (32x32 for CIFAR, any size works); output
    (B, num_classes). Dropout draws from the "dropout" rng stream in training."""
    depth: int
    widen_factor: int
    num_classes: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if (self.depth - 4) % 6:
            raise ValueError(f"a WRN's depth is 6n + 4, got {self.depth}")
        blocks_per_group = (self.depth - 4) // 6
        x = _conv3x3(16)(images)
        for group, stride in enumerate((1, 2, 2)):
            for index in range(blocks_per_group):
                x = WideBlock(16 * 2 ** group * self.widen_factor, stride if index == 0 else 1,
                              self.dropout_rate)(x, train)
        x = _norm_relu(x, train)
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


@register_model("wrn28_10")
def wrn28_10(num_classes: int, dropout_rate: float = 0.0) -> nn.Module:
    """WRN-28-10: 4 blocks per group, widths 160, 320, 640 (the paper trains it with dropout 0.3)."""
    return WideResNet(depth=28, widen_factor=10, num_classes=num_classes, dropout_rate=dropout_rate)
