"""Models found by name. Adding a model is one new file in this package that calls ``register_model``,
plus one import line at the bottom of this file.

Every model is a Flax module called as ``model.apply(variables, images, train=...)`` on float images
(B, H, W, C), returning raw outputs (B, num_classes) from a final ``nn.Dense`` named ``head``. Models with
BatchNorm keep its statistics in the ``batch_stats`` collection; models with dropout draw from the
``dropout`` rng stream when ``train`` is true.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TORCH_WEIGHTS: dict[str, "TorchWeights"] = {}


@dataclasses.dataclass(frozen=True)
class TorchWeights:
    """How a model's variables are named in the torchvision checkpoint whose architecture it mirrors.

    ``to_flax`` takes torch-named tensors (numpy) without the head's, pops every tensor it uses from that
    dict, and returns Flax variables {"params": ..., "batch_stats": ...} without the head; a tensor it needs
    but cannot find raises KeyError(name). ``to_torch`` is its inverse for a whole model (head included).
    ``head_keys`` are the torch names of the classification head, which fine-tuning replaces;
    ``standard_file`` is torchvision's file name for the ImageNet weights.
    """
    to_flax: Callable[[dict[str, np.ndarray]], dict]
    to_torch: Callable[[dict], dict[str, np.ndarray]]
    head_keys: tuple[str, ...]
    standard_file: str


def register_model(name: str, *, torch_weights: TorchWeights | None = None):
    """Decorator: registers ``factory(num_classes, dropout_rate=0.0) -> flax Module`` under ``name``, with
    the conversion of its torchvision weights where it has one."""
    def add(factory):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = factory
        if torch_weights is not None:
            _TORCH_WEIGHTS[name] = torch_weights
        return factory
    return add


def model_names() -> list[str]:
    return sorted(_MODELS)


def torch_weights(name: str) -> TorchWeights | None:
    """The torchvision weight conversion of model ``name``, or None when it has none."""
    return _TORCH_WEIGHTS.get(name)


def create_model(name: str, num_classes: int, dropout_rate: float = 0.0) -> nn.Module:
    """The registered model ``name`` with a head of ``num_classes`` raw outputs."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    return _MODELS[name](num_classes=num_classes, dropout_rate=dropout_rate)


def input_problem(name: str, num_classes: int, dropout_rate: float, shape: tuple[int, ...]) -> str | None:
    """Why model ``name`` cannot take images of ``shape`` (H, W, C), or None when it can: its initialisation
    traced on abstract arrays, so nothing is computed or allocated."""
    model = create_model(name, num_classes, dropout_rate)
    images = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    try:
        jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    except Exception as error:  # any failure to trace is the model refusing this shape
        return (str(error).strip().splitlines() or [type(error).__name__])[0]
    return None


from oat_jax.models import lightweight  # noqa: E402,F401  (each import registers its models)
from oat_jax.models import vit  # noqa: E402,F401
from oat_jax.models import resnet, wide_resnet  # noqa: E402,F401
