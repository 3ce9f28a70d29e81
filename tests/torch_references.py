"""Reference models in plain ``torch.nn`` for the fidelity tests of the converted Flax models.

torchvision is not importable next to the installed torch, so these are written from the papers' and
torchvision's documented architectures, independently of the project's Flax code: ResNet v1.5 (stride on the
bottleneck's 3x3 conv) with basic or bottleneck blocks, and the pre-LayerNorm Vision Transformer. Their
``state_dict()`` names are torchvision's (``layer1.0.downsample.0.weight``, ``encoder.layers.encoder_layer_0.
self_attention.in_proj_weight``, ...), so a state dict of theirs is what the project's converters read from a
torchvision checkpoint. Sizes are parameters, so tests can use small instances; ``randomize`` draws random
weights and random BatchNorm running statistics, since freshly initialised ones (unit scale, zero mean, unit
variance) would hide a swapped or mis-laid tensor.

Importing this module needs torch: import it after ``pytest.importorskip("torch")``.
"""
from __future__ import annotations

import collections
import math

import torch
from torch import nn


# --- ResNet ---------------------------------------------------------------------------------------------------

def _conv(in_channels: int, out_channels: int, size: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free conv padded by size // 2 on every side (each is followed by a BatchNorm)."""
    return nn.Conv2d(in_channels, out_channels, size, stride=stride, padding=size // 2, bias=False)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The projection shortcut ("downsample.0" conv, "downsample.1" BatchNorm) where a block changes the shape."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv(in_channels, out_channels, 1, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; the first carries the stride. Output ``planes`` channels."""
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, width_per_group: int = 64):
        super().__init__()
        if width_per_group != 64:
            raise ValueError("a basic block has no width factor")
        self.conv1, self.bn1 = _conv(in_channels, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 conv to ``planes * width_per_group / 64`` channels, 3x3 conv with the stride (ResNet v1.5), 1x1 conv
    to ``4 * planes``. A width factor of 128 gives the Wide ResNet-50-2 block."""
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, width_per_group: int = 64):
        super().__init__()
        width, out = planes * width_per_group // 64, planes * self.expansion
        self.conv1, self.bn1 = _conv(in_channels, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, out, 1), nn.BatchNorm2d(out)
        self.downsample = _downsample(in_channels, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """7x7/2 stem conv, BatchNorm, ReLU, 3x3/2 max pool, four stages of ``blocks[i]`` blocks with 64 * 2^i planes
    (stages 2-4 halve the resolution in their first block), global average pool, linear ``fc``.
    NCHW float images in, (B, num_classes) out."""

    def __init__(self, block: type, blocks: tuple[int, ...], num_classes: int, width_per_group: int = 64):
        super().__init__()
        self.conv1, self.bn1 = _conv(3, 64, 7, 2), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for stage, count in enumerate(blocks):
            planes, stage_blocks = 64 * 2 ** stage, []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                stage_blocks.append(block(channels, planes, stride, width_per_group))
                channels = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.num_stages = len(blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(images))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def resnet18(num_classes: int) -> ResNet:
    """ResNet-18's architecture: basic blocks [2, 2, 2, 2]."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def wide_resnet50_2(num_classes: int) -> ResNet:
    """Wide ResNet-50-2's architecture: bottlenecks [3, 4, 6, 3], 3x3 convs twice as wide as ResNet-50's."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width_per_group=128)


# --- Vision Transformer ---------------------------------------------------------------------------------------

class EncoderBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(ln_1(x)), then that + mlp(ln_2(that)); LayerNorm eps 1e-6 and an
    exact-GELU MLP whose linear layers are ``mlp.0`` and ``mlp.3`` (dropouts at 2 and 4)."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_dim, hidden_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(x)
        x = x + self.self_attention(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Adds the learned ``pos_embedding``, then the blocks ``layers.encoder_layer_{i}`` and the LayerNorm ``ln``."""

    def __init__(self, tokens: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, hidden_dim).normal_(std=0.02))
        self.layers = nn.Sequential(collections.OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim)) for i in range(num_layers)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class VisionTransformer(nn.Module):
    """Square ``image_size`` images cut into ``patch_size`` patches embedded by a strided conv ``conv_proj``,
    flattened row-major, a learned ``class_token`` prepended, the encoder, and the class token's output through
    ``heads.head``. NCHW float images in, (B, num_classes) out."""

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, num_classes: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder((image_size // patch_size) ** 2 + 1, num_layers, num_heads, hidden_dim, mlp_dim)
        self.heads = nn.Sequential(collections.OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.conv_proj(images).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h * w, D)
        tokens = torch.cat([self.class_token.expand(len(images), -1, -1), patches], dim=1)
        return self.heads(self.encoder(tokens)[:, 0])


# --- random values ----------------------------------------------------------------------------------------------

def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with every parameter and BatchNorm running statistic redrawn, returned in eval mode.

    Weights with a fan-in (convs, linear layers, attention projections) are normal with variance 1/fan-in, so
    activations keep their scale through deep networks; everything else (biases, norm scales and shifts, class
    token, position embedding) is drawn around its usual value. BatchNorm running means are uniform in
    [-0.5, 0.5] and running variances in [0.5, 2], so the eval-mode normalisation is no identity."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.dim() >= 2:
                fan_in = math.prod(parameter.shape[1:])
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # the scale of a BatchNorm or LayerNorm
                uniform(parameter, 0.5, 1.5)
            else:
                uniform(parameter, -0.5, 0.5)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                uniform(module.running_mean, -0.5, 0.5)
                uniform(module.running_var, 0.5, 2.0)
    return model.eval()
