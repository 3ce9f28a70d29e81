"""Models found by name. Adding a model is one new file in this package that calls ``register_model``,
plus one import line at the bottom of this file."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: registers ``factory(num_classes) -> flax Module`` under ``name``."""
    def add(factory):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = factory
        return factory
    return add


def model_names() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int) -> nn.Module:
    """The registered model ``name`` with a head of ``num_classes`` raw outputs."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    return _MODELS[name](num_classes=num_classes)


from oat_jax.models import lightweight  # noqa: E402,F401  (registers itself)
