"""Training objectives by name: what an arm of an experiment minimises and how its outputs are read.

An arm (``config.arms``) names one objective. Each objective gives its loss per example on (outputs, labels,
mask) and how a test batch's outputs are decoded: "argmax" of the outputs, or "anchor", OAT's decoding with
the test batch's own anchor. An objective that builds its targets from the batch anchor (``uses_anchor``)
gets OAT's telemetry (the largest target met). Adding an objective takes one loss function and one entry
in ``OBJECTIVES``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import optax

from oat_jax import oat


class LossSettings(NamedTuple):
    """The config fields a loss may read (hashable: a static argument of the jitted steps)."""
    variant: str = "released"
    anchor_gradient: bool | None = None
    anchor_groups: int = 1  # OAT anchors per batch: one per device with anchor_scope="device"


class Objective(NamedTuple):
    loss: Callable  # (outputs (B, C), labels (B,), mask (B,), settings) -> (B,), 0 on padded rows
    decode: str  # "argmax" or "anchor"
    uses_anchor: bool


def cross_entropy(outputs, labels, mask, settings: LossSettings):
    """Softmax cross-entropy (optax's, with integer labels)."""
    return jnp.where(mask, optax.softmax_cross_entropy_with_integer_labels(outputs, labels), 0.0)


def oat_regression(outputs, labels, mask, settings: LossSettings):
    """OAT (eq. 3): squared error against onehot(y) / anchor - 1, the anchor of the batch (or of its group)."""
    return oat.grouped_oat_loss(outputs, labels, mask, groups=settings.anchor_groups, variant=settings.variant,
                                anchor_gradient=settings.anchor_gradient)


OBJECTIVES: dict[str, Objective] = {
    "ce": Objective(cross_entropy, decode="argmax", uses_anchor=False),
    "oat": Objective(oat_regression, decode="anchor", uses_anchor=True),
}

# The arm that continues the shared pre-training (itself cross-entropy) has this objective.
PRETRAINING = "ce"


def get(name: str) -> Objective:
    return OBJECTIVES[name]


def names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


def parse_arms(text: str) -> list[str]:
    """``"ce, oat"`` -> ["ce", "oat"]; ValueError naming what is wrong (unknown, repeated or none)."""
    arms = [name.strip() for name in text.split(",") if name.strip()]
    if not arms:
        raise ValueError(f"arms names no objective; known objectives: {', '.join(names())}")
    unknown = [name for name in arms if name not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective '{unknown[0]}' in arms; known objectives: {', '.join(names())}")
    if len(set(arms)) < len(arms):
        raise ValueError(f"arms names an objective twice: {text}")
    return arms
