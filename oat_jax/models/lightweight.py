"""The paper's lightweight CNN (Sec. 3.2): conv 6@5x5 and conv 16@5x5, each ReLU + 2x2 max-pool, then fully
connected 128 -> 64 -> num_classes. Unpadded convolutions, as in the classic LeNet-style PyTorch model."""
from __future__ import annotations

import flax.linen as nn
import jax

from oat_jax.models import register_model


class LightweightCNN(nn.Module):
    """Input (B, H, W, C) float images, any H, W >= 16 and any channel count; output (B, num_classes)."""
    num_classes: int

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm or dropout: the same in training and evaluation
        if images.shape[1] < 16 or images.shape[2] < 16:
            raise ValueError(f"the lightweight CNN needs images of at least 16x16 pixels, got {images.shape[1:3]}")
        x = images
        for features in (6, 16):
            x = nn.Conv(features, kernel_size=(5, 5), padding="VALID")(x)
            x = nn.max_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(self.num_classes, name="head")(x)


@register_model("lightweight")
def lightweight(num_classes: int, dropout_rate: float = 0.0) -> nn.Module:
    if dropout_rate:
        raise ValueError("the lightweight CNN has no dropout; leave dropout_rate at 0")
    return LightweightCNN(num_classes=num_classes)
