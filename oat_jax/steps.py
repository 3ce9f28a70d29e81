"""The jitted, pure steps: an SGD step of any objective, many steps fused into one compiled loop, and an
evaluation step; ``Experiment.bind_steps`` binds them to their ``StepSettings`` once per arm.

The ``*_replicas`` steps run K independent replicas (seeds) in one program over a leading axis of the states
and the batch (images (K, B, H, W, C) uint8, labels (K, B), masks (K, B) of real rows). Each training step adds
itself to the epoch's metrics on the device (``new_metrics``), read once an epoch. ``train_step`` is the step
of a single model, for one's own loop.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from oat_jax import oat, objectives
from oat_jax.names import BATCH, SINGLE, TRAIN_ANCHOR, UNIFORM
from oat_jax.objectives import LossSettings


@struct.dataclass
class StepSettings:
    """What a step closes over: the normalisation and the steps whose anchor is kept (arguments: as constants
    XLA would fold them and change the last bits), the objective and its loss settings (static). Without an
    objective the steps evaluate with the config's anchor variant."""
    mean: Any
    std: Any
    sample_at: Any = None  # ``sampled_steps``
    objective: str | None = struct.field(pytree_node=False, default=None)
    loss: LossSettings = struct.field(pytree_node=False, default=LossSettings())

    @property
    def variant(self) -> str:
        return objectives.anchor_variant(self.objective, self.loss.variant)


@struct.dataclass
class OnDevice:
    """The training set on every device, from which a fused epoch gathers its batches; with ``batch_sharding``
    each device trains on its slice of each."""
    images: Any
    labels: Any
    num_real: int  # the training set's size, past which an order is padding (an argument, as in StepSettings)
    batch_size: int = struct.field(pytree_node=False)
    batch_sharding: Any = struct.field(pytree_node=False, default=None)


def _over_replicas(fn):
    """Applies ``fn`` to each replica (leading axis K) of its arguments in one program: ``vmap`` on
    accelerators; on XLA:CPU K unrolled copies, as a vmapped convolution there becomes a slow grouped one
    (``benchmarks/results/cpu_step_time_*.json``, "seeds": 4.67 ms a seed at K = 4, 5.31 ms alone)."""
    def over(*args):
        replicas = jax.tree.leaves(args)[0].shape[0]
        if replicas == 1:
            squeezed = jax.tree.map(lambda leaf: leaf[0], args)
            return jax.tree.map(lambda leaf: leaf[None], fn(*squeezed))
        if _vectorise_replicas():
            return jax.vmap(fn)(*args)
        # Unrolled: K independent copies of the step in one program, which XLA:CPU may run concurrently.
        results = [fn(*jax.tree.map(lambda leaf: leaf[k], args)) for k in range(replicas)]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *results)
    return over


def _vectorise_replicas() -> bool:
    return jax.default_backend() != "cpu"


def normalise(images, mean, std):
    """uint8 images -> float32, standardised per channel (done on the device, inside the step)."""
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def _forward_train(state, params, images, settings: StepSettings):
    """Outputs in training mode and the updated BatchNorm statistics. The dropout key comes from the replica's
    key and the step number, so a resumed run draws the same keys. Padded rows enter BatchNorm's statistics
    (the loss and the anchor mask them out)."""
    dropout = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    outputs, updates = state.apply_fn(state.variables(params), normalise(images, settings.mean, settings.std),
                                      train=True, rngs={"dropout": dropout}, mutable=["batch_stats"])
    return outputs, updates.get("batch_stats", state.batch_stats)


def _sgd_step(state, batch, settings: StepSettings):
    """One SGD step: the new state, the mean loss over the real rows and the batch anchor (telemetry for
    every objective)."""
    images, labels, mask = batch

    def loss_fn(params):
        outputs, batch_stats = _forward_train(state, params, images, settings)
        losses = objectives.get(settings.objective).loss(outputs, labels, mask, settings.loss)
        # Divided before summed: large OAT targets cannot overflow the sum.
        loss = jnp.sum(jnp.where(mask, losses / jnp.maximum(jnp.sum(mask), 1), 0.0))
        anchor = oat.batch_anchor(jax.lax.stop_gradient(outputs), variant=settings.variant, where=mask)
        return loss, (anchor, batch_stats)

    (loss, (anchor, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss, anchor


@functools.partial(jax.jit, static_argnames=("objective", "loss"), donate_argnums=0)
def train_step(state, batch, mean, std, *, objective: str, loss: LossSettings = LossSettings()):
    """One SGD step of a single model on a batch (images (B, H, W, C) uint8, labels (B,), mask (B,) of real
    rows); ``objective`` names an entry of ``oat_jax.objectives`` ("ce", "oat"). Returns the new state, the
    batch loss and the batch's anchor (C,), computed inside the step (for "ce" only as telemetry)."""
    return _sgd_step(state, batch, StepSettings(mean, std, None, objective, loss))


# An epoch's running metrics, per replica: accumulated inside the steps, read once the epoch is over.
SAMPLED_STEPS = 5  # steps of each epoch whose batch anchor is kept, evenly spread
_NO_STEP = -1


def new_metrics(replicas: int, num_classes: int) -> dict:
    """The metrics of an epoch not yet begun, for K replicas (host arrays)."""
    zeros = functools.partial(np.zeros, dtype=np.float32)
    return {"steps": np.zeros(replicas, np.int32), "rows": np.zeros(replicas, np.int32),
            "loss_sum": zeros(replicas), "anchor_sum": zeros((replicas, num_classes)),
            "max_target": np.ones(replicas, np.float32),  # |-1|, the smallest any target reaches
            "sampled_anchors": zeros((replicas, SAMPLED_STEPS, num_classes)),
            "first_bad_step": np.full(replicas, _NO_STEP, np.int32), "bad_loss": zeros(replicas),
            "bad_anchor": zeros((replicas, num_classes))}


def sampled_steps(count: int) -> np.ndarray:
    """Which steps (0-based) of an epoch keep their anchor: SAMPLED_STEPS, evenly spread."""
    return np.linspace(0, count - 1, SAMPLED_STEPS).round().astype(np.int32)


def _accumulate(metrics, loss, anchor, batch, sample_at, uses_anchor: bool):
    _, labels, mask = batch
    rows = jnp.sum(mask).astype(jnp.int32)
    step = metrics["steps"]
    finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(anchor))
    first_bad = (metrics["first_bad_step"] == _NO_STEP) & ~finite
    updated = {
        "steps": step + 1, "rows": metrics["rows"] + rows,
        "loss_sum": metrics["loss_sum"] + loss * rows, "anchor_sum": metrics["anchor_sum"] + anchor * rows,
        "sampled_anchors": jnp.where((sample_at == step)[:, None], anchor, metrics["sampled_anchors"]),
        "first_bad_step": jnp.where(first_bad, step, metrics["first_bad_step"]),
        "bad_loss": jnp.where(first_bad, loss, metrics["bad_loss"]),
        "bad_anchor": jnp.where(first_bad, anchor, metrics["bad_anchor"]),
        "max_target": metrics["max_target"]}
    if uses_anchor:  # the label entries' 1/a_y - 1; the others' targets are -1
        label_anchor = jnp.maximum(anchor, oat.ANCHOR_FLOOR)[labels]
        largest = jnp.max(jnp.where(mask, 1.0 / label_anchor - 1.0, 0.0))
        updated["max_target"] = jnp.maximum(metrics["max_target"], largest)
    return updated


def _step_with_metrics(state, metrics, batch, settings: StepSettings):
    state, loss, anchor = _sgd_step(state, batch, settings)
    uses_anchor = objectives.get(settings.objective).uses_anchor
    return state, _accumulate(metrics, loss, anchor, batch, settings.sample_at, uses_anchor)


@functools.partial(jax.jit, donate_argnums=0)
def train_step_replicas(states, metrics, batch, settings: StepSettings):
    """One step of K replicas: the states and the metrics with this step added."""
    return _over_replicas(functools.partial(_step_with_metrics, settings=settings))(states, metrics, batch)


@functools.partial(jax.jit, static_argnames=("num_steps",), donate_argnums=0)
def train_steps_on_device(states, metrics, epoch, settings: StepSettings, data: OnDevice, *, num_steps: int):
    """``num_steps`` steps as one compiled loop, the same step on batches gathered from ``data`` on the
    devices; ``epoch`` is (the replicas' padded sample orders (K, S·B), the first step to take)."""
    step = functools.partial(_step_with_metrics, settings=settings)
    (orders, first_step), size = epoch, data.batch_size

    def split(batch):  # without it XLA would run the whole batch on every device
        return batch if data.batch_sharding is None else jax.lax.with_sharding_constraint(batch, data.batch_sharding)

    def body(carry, batch):
        index = jax.lax.dynamic_slice_in_dim(orders, batch * size, size, axis=1)  # (K, B)
        masks = split(jnp.broadcast_to(batch * size + jnp.arange(size) < data.num_real, index.shape))
        return _over_replicas(step)(*carry, (split(data.images[index]), split(data.labels[index]), masks)), None

    return jax.lax.scan(body, (states, metrics), first_step + jnp.arange(num_steps))[0]


def _correct(state, batch, train_anchor, settings: StepSettings, decodes, with_loss):
    images, labels, mask = batch
    outputs = state.apply_fn(state.variables(), normalise(images, settings.mean, settings.std), train=False)
    variant = settings.variant

    def with_anchor(anchor):  # eq. 4; anchor (C,) or one per row (B, C)
        return jnp.argmax(oat.decode(outputs, anchor), axis=-1)

    predictions = {
        UNIFORM: lambda: jnp.argmax(outputs, axis=-1),  # = the uniform anchor's decoding
        BATCH: lambda: oat.predict(outputs, variant=variant, where=mask),
        SINGLE: lambda: with_anchor(jax.vmap(lambda row: oat.batch_anchor(row[None], variant=variant))(outputs)),
        TRAIN_ANCHOR: lambda: with_anchor(train_anchor)}
    counts = {}
    for name in decodes:
        predicted = predictions[name]()
        counts[name] = jnp.sum(mask & (predicted == labels))
        counts[f"{name}_per_class"] = jnp.sum(jax.nn.one_hot(predicted, outputs.shape[-1]) * mask[:, None], axis=0)
        counts[f"{name}_correct_per_class"] = jnp.sum(  # by true class: each class's recall
            jax.nn.one_hot(labels, outputs.shape[-1]) * (mask & (predicted == labels))[:, None], axis=0)
    if with_loss:  # the objective's loss summed over the real rows (OAT's with this batch's anchor)
        losses = objectives.get(settings.objective).loss(outputs, labels, mask, settings.loss)
        counts["loss_sum"] = jnp.sum(jnp.where(mask, losses, 0.0))
    return counts


@functools.partial(jax.jit, static_argnames=("decodes", "with_loss"))
def eval_step_replicas(states, batch, train_anchors, settings: StepSettings, *,
                       decodes: tuple[str, ...] = (UNIFORM, BATCH), with_loss: bool = False):
    """Counts over the real rows of each replica's batch, per decoding in ``decodes`` (TRAIN_ANCHOR with
    ``train_anchors`` (K, C)): correct predictions (K,), predictions of each class "<decode>_per_class" and
    correct ones by true class "<decode>_correct_per_class" (K, C); ``with_loss``: the loss summed, "loss_sum"."""
    correct = functools.partial(_correct, settings=settings, decodes=decodes, with_loss=with_loss)
    return _over_replicas(correct)(states, batch, train_anchors)
