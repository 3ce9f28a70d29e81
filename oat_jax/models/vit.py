"""torchvision's Vision Transformer (Dosovitskiy et al., 2021) in Flax, registered as ViT-L/16 ("vit_l16"), with
the conversion of torchvision's ImageNet weights.

Images are cut into non-overlapping patches embedded by a strided convolution; a learned class token is
prepended, a learned position embedding added, and pre-LayerNorm encoder blocks (self-attention, then a GELU
MLP, each with a residual) follow; the class token's final LayerNorm output feeds the linear head. Flax module
names mirror torchvision's state-dict names, so the conversion is a table of layers (``weights``) plus the few
tensors outside standard layers.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oat_jax.models import TorchWeights, register_model, weights

# torchvision's vit_l_16: 16x16 patches, width 1024, 24 blocks of 16 heads, MLP 4096 (304,326,632 parameters
# with a 1000-class head at 224x224).
VIT_L16 = dict(patch_size=16, hidden_dim=1024, num_layers=24, num_heads=16, mlp_dim=4096)
LAYER_NORM_EPSILON = 1e-6  # torchvision's ViT uses 1e-6, not PyTorch's default 1e-5


def _layer_norm(name: str) -> nn.LayerNorm:
    # The two-pass variance matches PyTorch's LayerNorm more closely than Flax's default E[x^2] - E[x]^2.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, name=name)


def _dropout(rate: float, x: jax.Array, train: bool) -> jax.Array:
    return nn.Dropout(rate, deterministic=not train)(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with torchvision's parameter layout: one fused q, k, v projection
    ``in_proj`` (D -> 3D, in that order) and an output projection ``out_proj`` (D -> D). (B, T, D) -> (B, T, D)."""
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"the width {width} is not a multiple of the {self.num_heads} attention heads")
        qkv = nn.Dense(3 * width, name="in_proj")(x)
        heads = (batch, tokens, self.num_heads, width // self.num_heads)
        query, key, value = (part.reshape(heads) for part in jnp.split(qkv, 3, axis=-1))
        attended = jax.nn.dot_product_attention(query, key, value)  # scaled by 1/sqrt(head width)
        return nn.Dense(width, name="out_proj")(attended.reshape(batch, tokens, width))


class MLPBlock(nn.Module):
    """Linear (D -> mlp_dim), exact GELU, dropout, linear (-> D), dropout: torchvision's ``mlp.0`` / ``mlp.3``."""
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(x), approximate=False)
        y = nn.Dense(x.shape[-1], name="fc2")(_dropout(self.dropout_rate, y, train))
        return _dropout(self.dropout_rate, y, train)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block: x + dropout(attention(ln_1(x))), then that + mlp(ln_2(that))."""
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        attended = SelfAttention(self.num_heads, name="self_attention")(_layer_norm("ln_1")(x))
        x = x + _dropout(self.dropout_rate, attended, train)
        return x + MLPBlock(self.mlp_dim, self.dropout_rate, name="mlp")(_layer_norm("ln_2")(x), train)


class Encoder(nn.Module):
    """Adds the learned position embedding (its length fixed by the tokens seen at init), dropout, the blocks
    ``encoder_layer_{i}`` and the final LayerNorm ``ln``. (B, T, D) -> (B, T, D)."""
    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self._check_tokens(x.shape[1])
        position = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]))
        x = _dropout(self.dropout_rate, x + position, train)
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, name=f"encoder_layer_{i}")(x, train)
        return _layer_norm("ln")(x)

    def _check_tokens(self, tokens: int):
        # Without this, a different image size fails deep inside Flax with a bare shape mismatch.
        if self.has_variable("params", "pos_embedding"):
            expected = self.get_variable("params", "pos_embedding").shape[1]
            if expected != tokens:
                raise ValueError(f"the position embedding holds {expected - 1} patches but these images give "
                                 f"{tokens - 1}: apply the model to images of the size it was initialised with")


class VisionTransformer(nn.Module):
    """torchvision's ``VisionTransformer`` of any size. Input (B, H, W, C) float images with H and W multiples of
    ``patch_size``; output (B, num_classes) from the class token through ``head``. Dropout (``dropout_rate``,
    where torchvision puts it) draws from the ``dropout`` rng stream when ``train`` is true."""
    num_classes: int
    patch_size: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        _check_image_size(images.shape, self.patch_size)
        patch = (self.patch_size, self.patch_size)
        x = nn.Conv(self.hidden_dim, patch, strides=patch, padding="VALID", name="conv_proj")(images)
        x = x.reshape(x.shape[0], -1, self.hidden_dim)  # row-major over the patch grid, as torchvision flattens
        class_token = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim))
        x = jnp.concatenate([jnp.broadcast_to(class_token, (x.shape[0], 1, self.hidden_dim)).astype(x.dtype), x], 1)
        x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate, name="encoder")(x, train)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


def _check_image_size(shape: tuple[int, ...], patch_size: int):
    if len(shape) != 4:
        raise ValueError(f"the ViT takes images (B, H, W, C), got shape {shape}")
    height, width = shape[1:3]
    if height < patch_size or width < patch_size or height % patch_size or width % patch_size:
        raise ValueError(f"the ViT with {patch_size}x{patch_size} patches needs image sides that are multiples of "
                         f"{patch_size}, got {height}x{width}")


# --- torchvision weights -------------------------------------------------------------------------------------

# The standard layers of encoder block i, which weights' layer table converts: (torch name, Flax path, kind).
_BLOCK_LAYERS = (("ln_1", ("ln_1",), "layer_norm"),
                 ("self_attention.out_proj", ("self_attention", "out_proj"), "dense"),
                 ("ln_2", ("ln_2",), "layer_norm"),
                 ("mlp.0", ("mlp", "fc1"), "dense"),
                 ("mlp.3", ("mlp", "fc2"), "dense"))
_HEAD = ("heads.head", ("head",), "dense")
_TORCH_BLOCK = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.")


def _block(i: int) -> tuple[str, tuple[str, ...]]:
    return f"encoder.layers.encoder_layer_{i}", ("encoder", f"encoder_layer_{i}")


def torch_layers(num_layers: int) -> list[weights.Layer]:
    """The layer table (``weights.Layer``) of torchvision's ViT with ``num_layers`` blocks, without its head and
    without the tensors outside standard layers (``_loose_tensors``)."""
    layers = [("conv_proj", ("conv_proj",), "conv_bias")]
    for i in range(num_layers):
        prefix, path = _block(i)
        layers += [(f"{prefix}.{name}", (*path, *flax_path), kind) for name, flax_path, kind in _BLOCK_LAYERS]
    return layers + [("encoder.ln", ("encoder", "ln"), "layer_norm")]


def _loose_tensors(num_layers: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """(torch name, Flax params path, whether it is a Linear weight) of the class token, the position embedding
    and the fused q, k, v projections, which torch keeps outside standard layers."""
    loose = [("class_token", ("class_token",), False), ("encoder.pos_embedding", ("encoder", "pos_embedding"), False)]
    for i in range(num_layers):
        prefix, path = _block(i)
        in_proj = (*path, "self_attention", "in_proj")
        loose += [(f"{prefix}.self_attention.in_proj_weight", (*in_proj, "kernel"), True),
                  (f"{prefix}.self_attention.in_proj_bias", (*in_proj, "bias"), False)]
    return loose


def to_flax(tensors: dict[str, np.ndarray]) -> dict:
    """Flax variables {"params": ...} (no head) from torchvision ViT tensors of any size; pops each tensor it
    uses and raises KeyError(name) for a missing one. The number of blocks is read from the names."""
    num_layers = max((int(match.group(1)) for key in tensors if (match := _TORCH_BLOCK.match(key))), default=-1) + 1
    flat = traverse_util.flatten_dict(weights.layers_to_flax(tensors, torch_layers(num_layers)))
    for name, path, linear in _loose_tensors(num_layers):
        tensor = weights.take(tensors, name)
        flat[("params", *path)] = weights.dense_to_flax(tensor) if linear else tensor
    return traverse_util.unflatten_dict(flat)


def to_torch(variables: dict) -> dict[str, np.ndarray]:
    """torchvision's state dict (head included) from a ViT's Flax variables: numpy arrays from concrete ones,
    traced arrays under ``jax.eval_shape``, which thus gives the layout."""
    num_layers = sum(key.startswith("encoder_layer_") for key in variables["params"]["encoder"])
    tensors = weights.layers_to_torch(variables, [*torch_layers(num_layers), _HEAD])
    params = traverse_util.flatten_dict(variables["params"])
    for name, path, linear in _loose_tensors(num_layers):
        leaf = weights.dense_to_torch(params[path]) if linear else params[path]
        tensors[name] = leaf if isinstance(leaf, jax.core.Tracer) else np.asarray(leaf)
    return tensors


TORCH_WEIGHTS = TorchWeights(to_flax=to_flax, to_torch=to_torch, head_keys=("heads.head.weight", "heads.head.bias"),
                             standard_file="vit_l_16-852ce7e3.pth")


@register_model("vit_l16", torch_weights=TORCH_WEIGHTS)
def vit_l16(num_classes: int, dropout_rate: float = 0.0) -> nn.Module:
    """ViT-L/16 as torchvision's ``vit_l_16``; its ImageNet weights expect 224x224 images."""
    return VisionTransformer(num_classes=num_classes, dropout_rate=dropout_rate, **VIT_L16)
