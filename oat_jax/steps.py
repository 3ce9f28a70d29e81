"""The jitted, pure steps: one SGD step (cross-entropy or OAT), a whole fused epoch, and an evaluation step.

The training loop runs a stack of independent replicas (seeds) side by side in one compiled program: the
``*_replicas`` functions map the single-replica step over a leading replica axis of the state and of the
batch, so every replica keeps its own parameters, data order and anchors. ``train_step`` is the same step
for a single model, for use in one's own loop.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from oat_jax import oat

_TRAIN_STATIC = ("objective", "variant", "anchor_gradient", "anchor_groups")


def _over_replicas(fn):
    """Applies ``fn`` to each replica (leading axis K) of its arguments inside one compiled program.

    One replica: ``fn`` itself. Several: ``vmap`` on accelerators; on XLA:CPU, K unrolled copies of ``fn``,
    because there a vmapped convolution over per-replica weights becomes a grouped convolution and a
    ``lax.map`` loop runs its body slowly: measured per seed at K = 4, both took about 2.5x the time of one
    replica, unrolled copies less than one replica (benchmarks.step_time's seeds figure).
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


def _masked_mean(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _forward_train(state, params, images, mean, std):
    """Outputs in training mode, and the BatchNorm statistics this batch updates (unchanged without BN).
    Each step draws its dropout key from the replica's key and the step number, so a resumed run draws
    the same keys as an uninterrupted one. The padded rows of a last, partial batch repeat a real sample;
    they enter that one batch's BatchNorm statistics (the loss and the anchor mask them out)."""
    dropout = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    outputs, updates = state.apply_fn(state.variables(params), normalise(images, mean, std), train=True,
                                      rngs={"dropout": dropout}, mutable=["batch_stats"])
    return outputs, updates.get("batch_stats", state.batch_stats)


def _sgd_step(state, images, labels, mask, mean, std, objective, variant, anchor_gradient, anchor_groups=1):
    def loss_fn(params):
        outputs, batch_stats = _forward_train(state, params, images, mean, std)
        if objective == "ce":
            loss = _masked_mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels), mask)
        else:
            losses = oat.grouped_oat_loss(outputs, labels, mask, groups=anchor_groups, variant=variant,
                                          anchor_gradient=anchor_gradient)
            # Divided before summed, as the loss reduced itself before it returned per-example values: the same
            # float rounding, so runs keep their earlier results.
            loss = jnp.sum(jnp.where(mask, losses / jnp.maximum(jnp.sum(mask), 1), 0.0))
        return loss, (oat.batch_anchor(jax.lax.stop_gradient(outputs), variant=variant, where=mask), batch_stats)

    (loss, (anchor, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss, anchor


@functools.partial(jax.jit, static_argnames=_TRAIN_STATIC, donate_argnums=0)
def train_step(state, images, labels, mask, mean, std, *, objective: str, variant: str = "released",
               anchor_gradient: bool | None = None, anchor_groups: int = 1):
    """One SGD step on a batch (B, H, W, C) uint8 with labels (B,) and mask (B,) of real rows.
    ``objective`` is "ce" (cross-entropy) or "oat"; ``anchor_groups`` > 1 gives each of that many equal
    groups of the batch its own anchor (``grouped_oat_loss``).

    Returns the new state, the batch loss, and the batch's anchor (C,), computed inside the step from the
    batch's own outputs (for "ce" only as telemetry).
    """
    return _sgd_step(state, images, labels, mask, mean, std, objective, variant, anchor_gradient, anchor_groups)


@functools.partial(jax.jit, static_argnames=_TRAIN_STATIC, donate_argnums=0)
def train_step_replicas(states, images, labels, masks, mean, std, *, objective: str, variant: str = "released",
                        anchor_gradient: bool | None = None, anchor_groups: int = 1):
    """``train_step`` for K replicas at once: states and batches carry a leading axis K
    (images (K, B, H, W, C), labels and masks (K, B)); returns losses (K,) and anchors (K, C)."""
    step = functools.partial(_sgd_step, mean=mean, std=std, objective=objective, variant=variant,
                             anchor_gradient=anchor_gradient, anchor_groups=anchor_groups)
    return _over_replicas(step)(states, images, labels, masks)


@functools.partial(jax.jit, static_argnames=_TRAIN_STATIC + ("batch_size", "batch_sharding"), donate_argnums=0)
def train_epoch_fused(states, images, labels, orders, num_real, mean, std, *, objective: str, batch_size: int,
                      variant: str = "released", anchor_gradient: bool | None = None, anchor_groups: int = 1,
                      batch_sharding=None):
    """A whole epoch of K replicas as one compiled loop over device-resident data (N, H, W, C) / (N,).

    ``orders`` (K, S·B) holds each replica's sample order padded to S whole batches; positions >= num_real
    are masked. The same steps as ``train_step_replicas``, without one dispatch per step. With the data
    replicated on several devices, ``batch_sharding`` (``sharding.batch_sharding``) makes each device gather
    and train on its own slice of every batch. Returns the states and per-step losses (S, K), anchors
    (S, K, C) and real-row counts (S, K).
    """
    step = functools.partial(_sgd_step, mean=mean, std=std, objective=objective, variant=variant,
                             anchor_gradient=anchor_gradient, anchor_groups=anchor_groups)

    def split(batch):  # without it XLA would run the whole batch on every device
        return batch if batch_sharding is None else jax.lax.with_sharding_constraint(batch, batch_sharding)

    def body(states, batch):
        index = jax.lax.dynamic_slice_in_dim(orders, batch * batch_size, batch_size, axis=1)  # (K, B)
        mask = batch * batch_size + jnp.arange(batch_size) < num_real
        masks = split(jnp.broadcast_to(mask, index.shape))
        states, losses, anchors = _over_replicas(step)(states, split(images[index]), split(labels[index]), masks)
        return states, (losses, anchors, jnp.sum(masks, axis=1))

    return jax.lax.scan(body, states, jnp.arange(orders.shape[1] // batch_size))


def _correct(state, images, labels, mask, mean, std, variant, decodes):
    outputs = state.apply_fn(state.variables(), normalise(images, mean, std), train=False)
    predictions = {"ce": lambda: jnp.argmax(outputs, axis=-1),
                   "oat": lambda: oat.predict(outputs, variant=variant, where=mask)}
    counts = {}
    for name in decodes:
        predicted = predictions[name]()
        counts[name] = jnp.sum(mask & (predicted == labels))
        counts[f"{name}_per_class"] = jnp.sum(jax.nn.one_hot(predicted, outputs.shape[-1]) * mask[:, None], axis=0)
    return counts


@functools.partial(jax.jit, static_argnames=("variant", "decodes"))
def eval_step_replicas(states, images, labels, masks, mean, std, *, variant: str = "released",
                       decodes: tuple[str, ...] = ("ce", "oat")):
    """Correct predictions among the real rows of each replica's test batch (K replicas, leading axis K),
    for each decoding in ``decodes``: "ce" = argmax of the outputs; "oat" = argmax of a_test * (z + 1) with
    the batch's own anchor. Counts of shape (K,), and under "<decode>_per_class" the number of predictions
    of each class (K, C)."""
    correct = functools.partial(_correct, mean=mean, std=std, variant=variant, decodes=decodes)
    return _over_replicas(correct)(states, images, labels, masks)
