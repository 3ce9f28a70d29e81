"""Online Anchor-based Training (OAT): the method as pure functions.

For a batch of raw model outputs ``z`` (B, C) and integer labels ``y`` (B,):

* anchor ``a`` (C,): the softmaxed centre of the batch's outputs (eq. 1);
* targets ``t`` (B, C) = onehot(y) / a - 1: the percentage change of the label w.r.t. the anchor (eq. 2);
* loss: squared error between ``z`` and ``t`` (eq. 3), per example as optax's losses are: the caller reduces
  (their mean over the batch is the paper's mean squared error);
* decoding: scores ``a_test * (z + 1)`` with the anchor of the test batch itself (eq. 4).

``grouped_oat_loss`` is the loss with each of G equal groups of the batch regressed against its own anchor:
the per-device anchor of a data-parallel loop.

Two variants of the anchor exist and both are supported:

* ``"released"`` (the default), as in the authors' released PyTorch code (GitHub ``IDT-ITI/OAT``,
    ``oat_efficientnet.py``): ``softmax(mean_b softmax(z_b))``.
    The inner softmax bounds the anchor to [1/(e*C), e/C]. The code builds the targets from ``z`` without
    detaching them, so the gradient flows through the anchor.
* ``"paper"``, eq. 1 taken literally: ``softmax(mean_b z_b)``, with the targets treated as constants.

Every function takes an optional ``where`` mask (B,) of real rows, like optax's losses: padded rows never
enter an anchor, a loss or a statistic. All functions are pure and jit-able (pass ``variant`` statically).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

VARIANTS = ("released", "paper")

# The paper variant's anchor underflows to 0 when the batch centre has a large spread (e.g. logits 0 and
# 200), and 1/a then is inf. The anchor is clamped from below at float32 epsilon, so every target stays
# finite (at most 1/eps - 1 ~ 8.4e6); training with such targets diverges visibly instead of producing NaN.
# The released variant's anchor is >= 1/(e*C) and never reaches the floor for any realistic C.
ANCHOR_FLOOR = float(jnp.finfo(jnp.float32).eps)

_DEFAULT_ANCHOR_GRADIENT = {"released": True, "paper": False}


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown OAT variant {variant!r}; expected one of {VARIANTS}")


def _zero_padding(outputs: jax.Array, where: jax.Array | None) -> jax.Array:
    """Replaces padded rows by zeros before any arithmetic: a padded row holding huge values would
    otherwise overflow, and its inf gradient times the mask's zero is NaN."""
    if where is None:
        return outputs
    return jnp.where(jnp.asarray(where, dtype=bool)[:, None], outputs, 0)


def _masked_row_mean(values: jax.Array, where: jax.Array | None) -> jax.Array:
    """Mean over the real rows of ``values`` (B, ...). Divides before summing so large values cannot overflow."""
    if where is None:
        return jnp.sum(values / values.shape[0], axis=0)
    where = jnp.asarray(where, dtype=bool)
    count = jnp.maximum(jnp.sum(where), 1).astype(values.dtype)  # an all-padding batch gives 0, not NaN
    mask = where.reshape(where.shape + (1,) * (values.ndim - 1))
    # jnp.where, not multiplication: a padded row may hold inf, and 0 * inf is NaN.
    return jnp.sum(jnp.where(mask, values / count, 0), axis=0)


def batch_anchor(outputs: jax.Array, *, variant: str = "released",
                 where: jax.Array | None = None) -> jax.Array:
    """Anchor of a batch: the softmaxed centre of its outputs (eq. 1).

    Args:
        outputs: (B, C) raw model outputs (no softmax applied).
        variant: "released" = softmax(mean_b softmax(outputs_b)); "paper" = softmax(mean_b outputs_b).
        where: optional (B,) bool mask of real rows; only they enter the mean.

    Returns:
        (C,) anchor, each entry clamped from below at ``ANCHOR_FLOOR`` (see there). A batch of one gives the
        sample's own anchor; a batch with no real row gives the uniform anchor.
    """
    _check_variant(variant)
    outputs = _zero_padding(jnp.asarray(outputs), where)
    if variant == "released":
        centre = _masked_row_mean(jax.nn.softmax(outputs, axis=-1), where)
    else:
        centre = _masked_row_mean(outputs, where)
    # Clamp in log space: log_softmax stays finite where softmax would underflow to 0.
    log_anchor = jax.nn.log_softmax(centre, axis=-1)
    return jnp.exp(jnp.maximum(log_anchor, jnp.log(ANCHOR_FLOOR)))


def oat_targets(labels: jax.Array, anchor: jax.Array, num_classes: int) -> jax.Array:
    """OAT targets (eq. 2): the one-hot labels' percentage change w.r.t. the anchor.

    Args:
        labels: (B,) integer class labels.
        anchor: (C,) anchor, C == num_classes.
        num_classes: C.

    Returns:
        (B, C) targets ``onehot(labels) / anchor - 1``.
    """
    onehot = jax.nn.one_hot(labels, num_classes, dtype=anchor.dtype)
    return onehot / anchor - 1.0


def oat_loss(outputs: jax.Array, labels: jax.Array, *, num_classes: int | None = None,
             variant: str = "released", anchor_gradient: bool | None = None,
             where: jax.Array | None = None) -> jax.Array:
    """OAT loss (eq. 3) per example: each row's mean squared error against its OAT target, like optax's
    ``softmax_cross_entropy_with_integer_labels``; ``oat_loss(outputs, labels).mean()`` is the batch loss.

    Args:
        outputs: (B, C) raw model outputs.
        labels: (B,) integer labels.
        num_classes: C; defaults to ``outputs.shape[-1]`` (must equal it when given).
        variant: anchor variant, see ``batch_anchor``.
        anchor_gradient: whether the gradient flows through the anchor into the targets. None = the variant's
            own behaviour (released: True, as the authors' code does not detach; paper: False, constant targets).
        where: optional (B,) bool mask of real rows.

    Returns:
        (B,) each row's squared error averaged over the C classes, 0 on padded rows. Their mean over the real
        rows (``values.sum() / where.sum()``) is PyTorch's ``nn.MSELoss()`` of the batch, as the released code
        computes it. The anchor couples the rows: with ``anchor_gradient`` the gradient of one row's value
        reaches every row's outputs.
    """
    _check_variant(variant)
    outputs = _zero_padding(jnp.asarray(outputs), where)
    if num_classes is None:
        num_classes = outputs.shape[-1]
    elif num_classes != outputs.shape[-1]:
        raise ValueError(f"num_classes={num_classes} but outputs have {outputs.shape[-1]} columns")
    if anchor_gradient is None:
        anchor_gradient = _DEFAULT_ANCHOR_GRADIENT[variant]
    anchor = batch_anchor(outputs, variant=variant, where=where)
    if not anchor_gradient:
        anchor = jax.lax.stop_gradient(anchor)
    targets = oat_targets(labels, anchor, num_classes)
    per_row = jnp.mean(jnp.square(outputs - targets), axis=-1)
    return per_row if where is None else jnp.where(jnp.asarray(where, dtype=bool), per_row, 0.0)


def grouped_oat_loss(outputs: jax.Array, labels: jax.Array, where: jax.Array | None = None, *, groups: int,
                     variant: str = "released", anchor_gradient: bool | None = None) -> jax.Array:
    """The OAT loss per example (B,) with the batch split into ``groups`` equal consecutive groups, each with
    the anchor of its own real rows: every real row's squared error against its group's targets, 0 on padded
    rows (reduce as with ``oat_loss``).

    On a batch sharded over that many devices, each group is one device's slice: the per-device anchor of a
    data-parallel run (no anchor crosses devices). ``groups=1`` is ``oat_loss``, the anchor of the whole
    batch. ``groups`` must divide the batch size B.
    """
    batch = outputs.shape[0]
    if groups < 1 or batch % groups:
        raise ValueError(f"groups={groups} does not split a batch of {batch} into equal groups")
    if groups == 1:
        return oat_loss(outputs, labels, variant=variant, anchor_gradient=anchor_gradient, where=where)
    where = jnp.ones((batch,), bool) if where is None else jnp.asarray(where, dtype=bool)

    def per_group(group_outputs, group_labels, group_mask):
        return oat_loss(group_outputs, group_labels, variant=variant, anchor_gradient=anchor_gradient,
                        where=group_mask)

    def split(x):
        return x.reshape((groups, x.shape[0] // groups) + x.shape[1:])

    return jax.vmap(per_group)(split(outputs), split(labels), split(where)).reshape(batch)


def decode(outputs: jax.Array, anchor: jax.Array) -> jax.Array:
    """Converts OAT outputs back to class scores (eq. 4).

    Args:
        outputs: (B, C) raw outputs of an OAT-trained model.
        anchor: (C,) anchor, at test time the test batch's own (``batch_anchor``).

    Returns:
        (B, C) scores ``anchor * (outputs + 1)``; their argmax is the predicted class.
    """
    return anchor * (outputs + 1.0)


def predict(outputs: jax.Array, *, variant: str = "released",
            where: jax.Array | None = None) -> jax.Array:
    """Predicted labels (B,) of an OAT model, decoding with the anchor of the (masked) batch itself.

    Padded rows get a prediction too (they do not influence the real rows'); callers ignore them.
    """
    anchor = batch_anchor(outputs, variant=variant, where=where)
    return jnp.argmax(decode(outputs, anchor), axis=-1).astype(jnp.int32)


def anchor_statistics(anchor: jax.Array) -> dict[str, jax.Array]:
    """Entropy (nats), min and max of an anchor (C,): how far it is from uniform (entropy ln C)."""
    anchor = jnp.asarray(anchor)
    return {
            "entropy": -jnp.sum(anchor * jnp.log(anchor)),
            "min": jnp.min(anchor),
            "max": jnp.max(anchor),
    }
