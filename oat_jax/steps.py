"""The jitted, pure steps: an SGD step of any objective (``oat_jax.objectives``), many steps fused into one
compiled loop, and an evaluation step.

The training loop runs a stack of independent replicas (seeds) side by side in one compiled program: the
``*_replicas`` functions map the single-replica step over a leading replica axis of the state and of the
batch, so every replica keeps its own parameters, data order and anchors. Each training step also adds
itself to the epoch's metrics (a small pytree, ``new_metrics``) on the device, so the host reads them once an
epoch. ``train_step`` is the step for a single model, for use in one's own loop.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from oat_jax import oat, objectives
from oat_jax.objectives import LossSettings

_TRAIN_STATIC = ("objective", "settings")


def _over_replicas(fn):
    """Applies ``fn`` to each replica (leading axis K) of its arguments inside one compiled program.

    One replica: ``fn`` itself. Several: ``vmap`` on accelerators; on XLA:CPU, K unrolled copies of ``fn``,
    because there a vmapped convolution over per-replica weights becomes a grouped convolution and a
    ``lax.map`` loop runs its body slowly, while unrolled copies cost about one replica's time each
    (``benchmarks/results/cpu_step_time_*.json``, "seeds": per seed at K = 4, 4.67 ms against 5.31 ms alone).
    """
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


def _forward_train(state, params, images, mean, std):
    """Outputs in training mode, and the BatchNorm statistics this batch updates (unchanged without BN).
    Each step draws its dropout key from the replica's key and the step number, so a resumed run draws
    the same keys as an uninterrupted one. The padded rows of a last, partial batch repeat a real sample;
    they enter that one batch's BatchNorm statistics (the loss and the anchor mask them out)."""
    dropout = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    outputs, updates = state.apply_fn(state.variables(params), normalise(images, mean, std), train=True,
                                      rngs={"dropout": dropout}, mutable=["batch_stats"])
    return outputs, updates.get("batch_stats", state.batch_stats)


def _sgd_step(state, images, labels, mask, mean, std, objective: str, settings: LossSettings):
    """One SGD step of ``objective``: the new state, the batch's mean loss over its real rows and the batch
    anchor of its outputs (for every objective: telemetry, compared across arms)."""
    def loss_fn(params):
        outputs, batch_stats = _forward_train(state, params, images, mean, std)
        losses = objectives.get(objective).loss(outputs, labels, mask, settings)
        # Divided before summed: large OAT targets cannot overflow the sum.
        loss = jnp.sum(jnp.where(mask, losses / jnp.maximum(jnp.sum(mask), 1), 0.0))
        variant = objectives.get(objective).variant or settings.variant
        anchor = oat.batch_anchor(jax.lax.stop_gradient(outputs), variant=variant, where=mask)
        return loss, (anchor, batch_stats)

    (loss, (anchor, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss, anchor


@functools.partial(jax.jit, static_argnames=("objective", "variant", "anchor_gradient", "anchor_groups"),
                   donate_argnums=0)
def train_step(state, images, labels, mask, mean, std, *, objective: str, variant: str = "released",
               anchor_gradient: bool | None = None, anchor_groups: int = 1):
    """One SGD step of a single model, for use in one's own loop, on a batch (B, H, W, C) uint8 with labels
    (B,) and a mask (B,) of real rows; ``objective`` names an entry of ``oat_jax.objectives`` ("ce", "oat").

    Returns the new state, the batch loss, and the batch's anchor (C,), computed inside the step from the
    batch's own outputs (for "ce" only as telemetry).
    """
    return _sgd_step(state, images, labels, mask, mean, std, objective,
                     LossSettings(variant, anchor_gradient, anchor_groups))


# An epoch's running metrics, per replica: accumulated inside the steps, read once the epoch is over.
SAMPLED_STEPS = 5  # steps of each epoch whose batch anchor is kept, evenly spread
_NO_STEP = -1


def new_metrics(replicas: int, num_classes: int) -> dict:
    """The metrics of an epoch not yet begun, for K replicas (host arrays; the first step places them)."""
    zeros = functools.partial(np.zeros, dtype=np.float32)
    return {"steps": np.zeros(replicas, np.int32), "rows": np.zeros(replicas, np.int32),
            "loss_sum": zeros(replicas), "anchor_sum": zeros((replicas, num_classes)),
            "max_target": np.ones(replicas, np.float32),  # |-1|, the smallest any target reaches
            "sampled_anchors": zeros((replicas, SAMPLED_STEPS, num_classes)),
            "first_bad_step": np.full(replicas, _NO_STEP, np.int32), "bad_loss": zeros(replicas),
            "bad_anchor": zeros((replicas, num_classes))}


def sampled_steps(count: int) -> np.ndarray:
    """Which steps (0-based) of an epoch of ``count`` keep their anchor: SAMPLED_STEPS, evenly spread (a
    short epoch repeats some)."""
    return np.linspace(0, count - 1, SAMPLED_STEPS).round().astype(np.int32)


def _accumulate(metrics, loss, anchor, labels, mask, sample_at, uses_anchor: bool):
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


def _step_with_metrics(state, metrics, images, labels, mask, sample_at, mean, std, objective, settings):
    state, loss, anchor = _sgd_step(state, images, labels, mask, mean, std, objective, settings)
    uses_anchor = objectives.get(objective).uses_anchor
    return state, _accumulate(metrics, loss, anchor, labels, mask, sample_at, uses_anchor)


@functools.partial(jax.jit, static_argnames=_TRAIN_STATIC, donate_argnums=0)
def train_step_replicas(states, metrics, images, labels, masks, sample_at, mean, std, *, objective: str,
                        settings: LossSettings = LossSettings()):
    """One step of K replicas at once: states, metrics and batches carry a leading axis K (images
    (K, B, H, W, C), labels and masks (K, B)). Returns the states and the metrics with this step added."""
    step = functools.partial(_step_with_metrics, sample_at=sample_at, mean=mean, std=std, objective=objective,
                             settings=settings)
    return _over_replicas(step)(states, metrics, images, labels, masks)


@functools.partial(jax.jit, static_argnames=_TRAIN_STATIC + ("batch_size", "num_steps", "batch_sharding"),
                   donate_argnums=0)
def train_steps_on_device(states, metrics, images, labels, orders, first_step, num_real, sample_at, mean, std, *,
                          objective: str, batch_size: int, num_steps: int, settings: LossSettings = LossSettings(),
                          batch_sharding=None):
    """``num_steps`` steps of K replicas from ``first_step`` on, as one compiled loop over device-resident
    data (N, H, W, C) / (N,): the same step as ``train_step_replicas``, its batches gathered on the device.

    ``orders`` (K, S·B) holds each replica's sample order padded to S whole batches; positions >= num_real
    are masked. With the data replicated on several devices, ``batch_sharding`` (``sharding.batch_sharding``)
    makes each device gather and train on its own slice of every batch.
    """
    step = functools.partial(_step_with_metrics, sample_at=sample_at, mean=mean, std=std, objective=objective,
                             settings=settings)

    def split(batch):  # without it XLA would run the whole batch on every device
        return batch if batch_sharding is None else jax.lax.with_sharding_constraint(batch, batch_sharding)

    def body(carry, batch):
        index = jax.lax.dynamic_slice_in_dim(orders, batch * batch_size, batch_size, axis=1)  # (K, B)
        masks = split(jnp.broadcast_to(batch * batch_size + jnp.arange(batch_size) < num_real, index.shape))
        return _over_replicas(step)(*carry, split(images[index]), split(labels[index]), masks), None

    return jax.lax.scan(body, (states, metrics), first_step + jnp.arange(num_steps))[0]


def _correct(state, images, labels, mask, train_anchor, mean, std, variant, decodes, objective=None,
             settings=LossSettings()):
    outputs = state.apply_fn(state.variables(), normalise(images, mean, std), train=False)

    def with_anchor(anchor):  # eq. 4; anchor (C,) or one per row (B, C)
        return jnp.argmax(oat.decode(outputs, anchor), axis=-1)

    predictions = {
        "argmax": lambda: jnp.argmax(outputs, axis=-1),  # = the uniform anchor's decoding
        "anchor": lambda: oat.predict(outputs, variant=variant, where=mask),
        "single": lambda: with_anchor(jax.vmap(lambda row: oat.batch_anchor(row[None], variant=variant))(outputs)),
        "train_anchor": lambda: with_anchor(train_anchor)}
    counts = {}
    for name in decodes:
        predicted = predictions[name]()
        counts[name] = jnp.sum(mask & (predicted == labels))
        counts[f"{name}_per_class"] = jnp.sum(jax.nn.one_hot(predicted, outputs.shape[-1]) * mask[:, None], axis=0)
        counts[f"{name}_correct_per_class"] = jnp.sum(  # by true class: each class's recall
            jax.nn.one_hot(labels, outputs.shape[-1]) * (mask & (predicted == labels))[:, None], axis=0)
    if objective is not None:  # the objective's loss summed over the real rows (OAT's with this batch's anchor)
        losses = objectives.get(objective).loss(outputs, labels, mask, settings)
        counts["loss_sum"] = jnp.sum(jnp.where(mask, losses, 0.0))
    return counts


# The decodings of a test batch's outputs ``eval_step_replicas`` counts.
DECODES = ("argmax", "anchor", "single", "train_anchor")


@functools.partial(jax.jit, static_argnames=("variant", "decodes", "objective", "settings"))
def eval_step_replicas(states, images, labels, masks, train_anchors, mean, std, *, variant: str = "released",
                       decodes: tuple[str, ...] = ("argmax", "anchor"), objective: str | None = None,
                       settings: LossSettings = LossSettings()):
    """Correct predictions among the real rows of each replica's test batch (K replicas, leading axis K),
    for each decoding in ``decodes`` (of ``DECODES``): "argmax" of the outputs (the uniform anchor's
    decoding); "anchor" = argmax of a * (z + 1) with the test batch's own anchor a (OAT's, eq. 4); "single"
    with each sample's own anchor, as in a batch of one; "train_anchor" with ``train_anchors`` (K, C), the
    replica's mean training anchor. The anchors are of ``variant``. Counts of shape (K,), under
    "<decode>_per_class" the number of predictions of each class (K, C), and under "<decode>_correct_per_class"
    the correct ones by true class (K, C). With ``objective``, also its loss
    summed over the real rows, "loss_sum" (K,)."""
    correct = functools.partial(_correct, mean=mean, std=std, variant=variant, decodes=decodes,
                                objective=objective, settings=settings)
    return _over_replicas(correct)(states, images, labels, masks, train_anchors)
