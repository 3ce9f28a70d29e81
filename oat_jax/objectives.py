"""Training objectives by name: what an arm of an experiment minimises and how its outputs are read.

An arm (``config.arms``) names one objective. Each objective gives its loss per example on (outputs, labels,
mask) and how a test batch's outputs are decoded (of ``names.DECODES``): with the uniform anchor (the argmax
of the outputs), or with the test batch's own anchor (OAT's). An objective that builds its targets from the
batch anchor (``uses_anchor``) gets OAT's telemetry (the largest target met). Adding an objective takes one
loss function and one entry in ``OBJECTIVES``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from oat_jax import oat
from oat_jax.names import BATCH, CE, OAT, PRETRAIN, UNIFORM


class LossSettings(NamedTuple):
    """The config fields a loss may read (hashable: a static argument of the jitted steps)."""
    variant: str = "released"
    anchor_gradient: bool | None = None
    anchor_groups: int = 1  # OAT anchors per batch: one per device with anchor_scope="device"
    square_k: float = 1.0
    square_m: float = 1.0
    label_smoothing: float = 0.1
    prior: tuple[float, ...] | None = None  # the training set's class frequencies π (None: uniform)
    logit_adjustment_tau: float = 1.0


class Objective(NamedTuple):
    loss: Callable  # (outputs (B, C), labels (B,), mask (B,), settings) -> (B,), 0 on padded rows
    decode: str  # UNIFORM, or BATCH (OAT's, with the test batch's anchor of ``variant``)
    uses_anchor: bool
    variant: str | None = None  # the anchor variant of its telemetry and decoding; None = the config's


def cross_entropy(outputs, labels, mask, settings: LossSettings):
    """Softmax cross-entropy (optax's, with integer labels)."""
    return jnp.where(mask, optax.softmax_cross_entropy_with_integer_labels(outputs, labels), 0.0)


def oat_regression(outputs, labels, mask, settings: LossSettings):
    """OAT (eq. 3): squared error against onehot(y) / anchor - 1, the anchor of the batch (or of its group)."""
    return oat.grouped_oat_loss(outputs, labels, mask, groups=settings.anchor_groups, variant=settings.variant,
                                anchor_gradient=settings.anchor_gradient)


def oat_paper(outputs, labels, mask, settings: LossSettings):
    """OAT with the paper's anchor softmax(mean z) (eq. 1) and constant targets, whatever ``variant`` says: both
    anchors can be arms of one run, from one pre-training."""
    return oat.grouped_oat_loss(outputs, labels, mask, groups=settings.anchor_groups, variant="paper")


def _fixed_anchor_loss(outputs, labels, mask, anchor):
    """OAT's squared error against onehot(y) / anchor - 1 with a fixed ``anchor`` (C,) instead of the batch's."""
    targets = oat.oat_targets(labels, anchor, outputs.shape[-1])
    return jnp.where(mask, jnp.mean(jnp.square(outputs - targets), axis=-1), 0.0)


def oat_uniform(outputs, labels, mask, settings: LossSettings):
    """OAT's loss with the anchor fixed at the uniform 1/C: targets C·onehot(y) - 1. Only the online anchor is
    taken away (the same targets function and squared error as ``oat.oat_loss``)."""
    classes = outputs.shape[-1]
    return _fixed_anchor_loss(outputs, labels, mask, jnp.full((classes,), 1.0 / classes, outputs.dtype))


def _prior(settings: LossSettings, outputs):
    """The training prior π (C,) as the outputs' dtype; uniform where the settings carry none."""
    classes = outputs.shape[-1]
    if settings.prior is None:
        return jnp.full((classes,), 1.0 / classes, outputs.dtype)
    return jnp.asarray(settings.prior, outputs.dtype)


def oat_prior(outputs, labels, mask, settings: LossSettings):
    """OAT's loss with the anchor fixed at softmax(π): what the released anchor, softmax(mean softmax z), would
    be if the network's mean softmax output equalled the training prior π. Decoded by argmax."""
    return _fixed_anchor_loss(outputs, labels, mask, jax.nn.softmax(_prior(settings, outputs)))


def logit_adjusted_cross_entropy(outputs, labels, mask, settings: LossSettings):
    """Cross-entropy on z + τ·log π (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021), τ =
    ``logit_adjustment_tau``; decoded by argmax of z itself, which then corrects for the prior."""
    adjusted = outputs + settings.logit_adjustment_tau * jnp.log(_prior(settings, outputs))
    return cross_entropy(adjusted, labels, mask, settings)


def square(outputs, labels, mask, settings: LossSettings):
    """Hui & Belkin's rescaled square loss (ICLR 2021): (1/C)·[k·(z_y - M)² + Σ_{i≠y} z_i²], with k =
    ``square_k`` and M = ``square_m``. With k = 1 and M = C it is OAT's loss at the uniform anchor, shifted."""
    onehot = jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)
    weights = 1.0 + (settings.square_k - 1.0) * onehot
    return jnp.where(mask, jnp.mean(weights * jnp.square(outputs - settings.square_m * onehot), axis=-1), 0.0)


def smoothed_cross_entropy(outputs, labels, mask, settings: LossSettings):
    """Cross-entropy against labels smoothed by ``label_smoothing`` (optax's ``smooth_labels``)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype),
                                  settings.label_smoothing)
    return jnp.where(mask, optax.softmax_cross_entropy(outputs, targets), 0.0)


OBJECTIVES: dict[str, Objective] = {
    CE: Objective(cross_entropy, decode=UNIFORM, uses_anchor=False),
    OAT: Objective(oat_regression, decode=BATCH, uses_anchor=True),
    # Controls: does OAT's gain come from its online anchor (issue 14)?
    "oat_paper": Objective(oat_paper, decode=BATCH, uses_anchor=True, variant="paper"),
    "oat_uniform": Objective(oat_uniform, decode=UNIFORM, uses_anchor=False),
    "square": Objective(square, decode=UNIFORM, uses_anchor=False),
    "ce_smooth": Objective(smoothed_cross_entropy, decode=UNIFORM, uses_anchor=False),
    # Class imbalance: a prior correction by the fixed training prior, against OAT's online one.
    "ce_logit_adjusted": Objective(logit_adjusted_cross_entropy, decode=UNIFORM, uses_anchor=False),
    "oat_prior": Objective(oat_prior, decode=UNIFORM, uses_anchor=False),
}

# The objective of the shared pre-training, which the arm of the same name continues.
PRETRAINING = CE


def get(name: str) -> Objective:
    return OBJECTIVES[name]


def of_arm(arm: str) -> str:
    """The objective an arm trains: its own name, the pre-training's cross-entropy for PRETRAIN."""
    return PRETRAINING if arm == PRETRAIN else arm


def anchor_variant(name: str | None, variant: str) -> str:
    """The anchor variant of objective ``name``'s telemetry and decoding: its own, else the config's
    ``variant`` (also for no objective)."""
    return (name and get(name).variant) or variant


def names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


def parse_arms(text: str) -> list[str]:
    """``"ce, oat"`` -> ["ce", "oat"]; ValueError naming what is wrong (unknown, repeated, empty or none)."""
    arms = [name.strip() for name in text.split(",")]
    if not any(arms):
        raise ValueError(f"arms names no objective; known objectives: {', '.join(names())}")
    if not all(arms):  # "ce,,oat" or "ce,oat,": a name left out or a stray comma, not to be guessed at
        raise ValueError(f"arms '{text}' has an empty name (a comma too many); separate the objectives by single "
                         f"commas, e.g. {','.join(name for name in arms if name)}")
    unknown = [name for name in arms if name not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective '{unknown[0]}' in arms; known objectives: {', '.join(names())}")
    if len(set(arms)) < len(arms):
        raise ValueError(f"arms names an objective twice: {text}")
    return arms
