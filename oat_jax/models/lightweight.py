"""The paper's lightweight CNN (Sec. 3.2): conv 6@5x5 and conv 16@5x5, each ReLU + 2x2 max-pool, then fully
connected 128 -> 64 -> num_classes. Unpadded convolutions, as in the classic LeNet-style PyTorch model."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from oat_jax.models import register_model


def _windows(x):
    """(B, H, W, C) -> (B, H/2, 2, W/2, 2, C): the 2x2 windows (an odd last row or column left out)."""
    b, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x):
    """``nn.max_pool(x, (2, 2), strides=(2, 2))``, the same values and the same gradient (the first maximum of a
    window, row by row, takes it, as XLA's select-and-scatter does), written as a reshape and a max: on XLA:CPU
    the reduce-window's gradient took about 1.5 ms of a 5 ms step of this model."""
    return jnp.max(_windows(x), axis=(2, 4))


def _max_pool_forward(x):
    windows = _windows(x)
    top = jnp.max(windows, axis=(2, 4))
    return top, (windows, top, x.shape)


def _max_pool_backward(saved, gradient):
    windows, top, (b, h, w, c) = saved
    hit = windows == top[:, :, None, :, None, :]
    corners = [hit[:, :, row, :, column] for row in (0, 1) for column in (0, 1)]
    taken, parts = jnp.zeros_like(corners[0]), []
    for corner in corners:  # row-major window order: only the first maximum is chosen
        parts.append(jnp.where(corner & ~taken, gradient, 0).astype(gradient.dtype))
        taken = taken | corner
    rows = [jnp.stack(parts[2 * row:2 * row + 2], axis=3) for row in (0, 1)]  # (B, H/2, W/2, 2, C)
    full = jnp.stack(rows, axis=2).reshape(b, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(full, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


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
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(self.num_classes, name="head")(x)


@register_model("lightweight")
def lightweight(num_classes: int, dropout_rate: float = 0.0) -> nn.Module:
    if dropout_rate:
        raise ValueError("the lightweight CNN has no dropout; leave dropout_rate at 0")
    return LightweightCNN(num_classes=num_classes)
