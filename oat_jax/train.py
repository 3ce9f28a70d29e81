"""Two-phase training: cross-entropy pre-training, then the cross-entropy and OAT arms, with Orbax
checkpoints every epoch and a resumable record of metrics.

``method="both"`` trains the shared pre-training once, saves it, continues it with cross-entropy to
``num_epochs`` (the baseline arm), and branches the OAT arm from the saved pre-trained state.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

from oat_jax import data, input_pipeline, models, oat
from oat_jax.checkpoints import ArmCheckpoints
from oat_jax.metrics_log import MetricsLog, summarise, write_json

# Fields that may differ between a run and its resumption without changing its results.
_COSMETIC_FIELDS = ("progress",)


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the message names arm, epoch and step and the likely cause."""


class WorkdirMismatch(RuntimeError):
    """The workdir holds a run made with another configuration."""


@functools.lru_cache(maxsize=None)
def _sgd(learning_rate: float, momentum: float) -> optax.GradientTransformation:
    """One optimiser object per setting: it is a static part of the jitted steps' signature, so a new but
    equal one would compile them again."""
    return optax.sgd(learning_rate, momentum=momentum)


# One module object per (name, classes): its apply method is a static part of the steps' signature too.
_model = functools.lru_cache(maxsize=None)(models.create_model)


def create_train_state(model, image_shape, config, seed: int) -> train_state.TrainState:
    params = model.init(jax.random.key(seed), jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=_sgd(config.learning_rate, config.momentum))
    # Typed and placed on the device like a restored checkpoint's arrays: a Python int step or uncommitted
    # arrays would make the jitted steps compile a second time after every restore.
    return jax.device_put(state.replace(step=jnp.asarray(0, jnp.int32)), jax.devices()[0])


def _masked_mean(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _normalise(images, mean, std):
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def _sgd_step(state, images, labels, mask, mean, std, objective, variant, anchor_gradient):
    def loss_fn(params):
        outputs = state.apply_fn({"params": params}, _normalise(images, mean, std))
        if objective == "ce":
            per_row = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
            loss = _masked_mean(per_row, mask)
        else:
            loss = oat.oat_loss(outputs, labels, variant=variant, anchor_gradient=anchor_gradient, where=mask)
        return loss, oat.batch_anchor(jax.lax.stop_gradient(outputs), variant=variant, where=mask)

    (loss, anchor), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), loss, anchor


@functools.partial(jax.jit, static_argnames=("objective", "variant", "anchor_gradient"), donate_argnums=0)
def train_step(state, images, labels, mask, mean, std, *, objective: str, variant: str = "released",
               anchor_gradient: bool | None = None):
    """One SGD step on a batch. ``objective`` is "ce" (cross-entropy) or "oat".

    Returns the new state, the batch loss, and the batch's anchor (for "ce" the anchor its outputs would
    have, for telemetry only). The anchor is computed inside the step from the batch's own outputs.
    """
    return _sgd_step(state, images, labels, mask, mean, std, objective, variant, anchor_gradient)


@functools.partial(jax.jit, static_argnames=("objective", "variant", "anchor_gradient", "batch_size"),
                   donate_argnums=0)
def train_epoch_fused(state, images, labels, order, num_real, mean, std, *, objective: str, batch_size: int,
                      variant: str = "released", anchor_gradient: bool | None = None):
    """A whole epoch as one compiled loop over device-resident data: the same steps as ``train_step`` on
    the batches ``order`` (padded to whole batches; positions >= num_real are masked), without one
    dispatch per step. Returns the state and the per-step losses, anchors and real-row counts."""
    def body(state, batch):
        positions = batch * batch_size + jnp.arange(batch_size)
        index = jax.lax.dynamic_slice(order, (batch * batch_size,), (batch_size,))
        mask = positions < num_real
        state, loss, anchor = _sgd_step(state, images[index], labels[index], mask, mean, std, objective,
                                        variant, anchor_gradient)
        return state, (loss, anchor, jnp.sum(mask))

    return jax.lax.scan(body, state, jnp.arange(order.shape[0] // batch_size))


@functools.partial(jax.jit, static_argnames=("variant", "decodes"))
def eval_step(state, images, labels, mask, mean, std, *, variant: str = "released",
              decodes: tuple[str, ...] = ("ce", "oat")):
    """Correct predictions among the real rows of a test batch, for each decoding in ``decodes``:
    "ce" = argmax of the outputs; "oat" = argmax of a_test * (z + 1) with the batch's own anchor."""
    outputs = state.apply_fn({"params": state.params}, _normalise(images, mean, std))
    predictions = {"ce": lambda: jnp.argmax(outputs, axis=-1),
                   "oat": lambda: oat.predict(outputs, variant=variant, where=mask)}
    return {name: jnp.sum(mask & (predictions[name]() == labels)) for name in decodes}


def evaluate(state, dataset: data.Dataset, config, mean, std,
             decodes: tuple[str, ...] = ("ce", "oat")) -> dict[str, float]:
    """Test accuracy (%) over every test sample, in batches of ``eval_batch_size``, per decoding."""
    order = input_pipeline.eval_order(len(dataset.test_labels), config.seed, config.shuffle_eval)
    counts = [eval_step(state, images, labels, mask, mean, std, variant=config.variant, decodes=decodes)
              for images, labels, mask in input_pipeline.batches(dataset.test_images, dataset.test_labels, order,
                                                                 config.eval_batch_size)]
    counts = jax.device_get(counts)
    return {name: 100.0 * sum(int(batch[name]) for batch in counts) / len(order) for name in decodes}


def _divergence_hint(objective, config):
    if objective == "oat" and config.variant == "paper":
        return ("the paper variant's anchor softmax(mean z) underflows when the outputs spread apart, and its "
                "targets 1/a - 1 explode; lower learning_rate or use variant='released'")
    return "the learning rate is likely too high for this model; lower learning_rate"


def train_epoch(state, dataset, config, epoch, objective, mean, std, arm, on_device=None):
    """One pass over the training set. Returns the new state, mean loss and the epoch's mean anchor.

    With ``on_device`` = (images, labels) already on the device, the epoch runs as one compiled loop
    (``train_epoch_fused``); otherwise step by step from host memory, with a progress bar."""
    order = input_pipeline.epoch_order(len(dataset.train_labels), config.seed, epoch)
    steps = input_pipeline.num_batches(len(order), config.batch_size)
    if on_device is not None:
        padded = np.concatenate([order, np.full(steps * config.batch_size - len(order), order[0])])
        state, (losses, anchors, weights) = train_epoch_fused(
            state, *on_device, padded.astype(np.int32), len(order), mean, std, objective=objective,
            batch_size=config.batch_size, variant=config.variant, anchor_gradient=config.anchor_gradient)
    else:
        losses, anchors, weights = [], [], []
        progress = tqdm(total=steps, desc=f"{arm} epoch {epoch}/{config.num_epochs}", leave=False,
                        disable=None if config.progress else True, file=sys.stderr)
        for images, labels, mask in input_pipeline.batches(dataset.train_images, dataset.train_labels, order,
                                                          config.batch_size):
            state, loss, anchor = train_step(state, images, labels, mask, mean, std, objective=objective,
                                             variant=config.variant, anchor_gradient=config.anchor_gradient)
            losses.append(loss)
            anchors.append(anchor)
            weights.append(mask.sum())
            progress.update()
        progress.close()
        losses, anchors = jnp.stack(losses), jnp.stack(anchors)
    losses = np.asarray(jax.device_get(losses), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise TrainingDiverged(
            f"training diverged: arm '{arm}', epoch {epoch}, step {bad[0] + 1} of {steps} has a non-finite "
            f"loss ({losses[bad[0]]}); {_divergence_hint(objective, config)}. The last good checkpoint "
            f"is kept.")
    weights = np.asarray(jax.device_get(weights), dtype=np.float64)
    mean_anchor = np.average(np.asarray(jax.device_get(anchors)), axis=0, weights=weights)
    return state, float(np.average(losses, weights=weights)), mean_anchor


def arms_of(method: str) -> list[str]:
    return {"both": ["ce", "oat"], "ce": ["ce"], "oat": ["oat"]}[method]


def _check_workdir_config(workdir, config):
    """Refuses a workdir holding a run made with another config; records the config for a fresh run."""
    path = os.path.join(workdir, "config.json")
    current = {k: v for k, v in config.to_dict().items() if k not in _COSMETIC_FIELDS}
    if os.path.exists(path):
        with open(path) as f:
            saved = {k: v for k, v in json.load(f).items() if k not in _COSMETIC_FIELDS}
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise WorkdirMismatch(
                f"workdir {workdir} holds a run with a different config (fields: {', '.join(changed)}); "
                f"rerun with the same config to resume it, or pass a new --workdir to start fresh")
        return
    write_json(path, current)


def _run_phase(state, dataset, config, arm, objective, first_epoch, last_epoch, checkpoints, log, mean, std,
               report, on_device):
    """Trains epochs first_epoch..last_epoch of one arm, checkpointing and logging each."""
    for epoch in range(first_epoch, last_epoch + 1):
        started = time.perf_counter()
        state, loss, mean_anchor = train_epoch(state, dataset, config, epoch, objective, mean, std, arm, on_device)
        accuracy = evaluate(state, dataset, config, mean, std, decodes=(objective,))
        record = {"arm": arm, "epoch": epoch, "objective": objective, "train_loss": loss,
                  "test_accuracy": accuracy[objective], "epoch_seconds": time.perf_counter() - started}
        if objective == "oat":
            record.update({f"anchor_{k}": float(v) for k, v in oat.anchor_statistics(mean_anchor).items()})
        # The line goes first: an epoch logged but not checkpointed is dropped and redone on resume.
        log.append(record)
        checkpoints.save(epoch, state)
        report(record)
    return state


def _print_epoch(record):
    extra = ""
    if "anchor_entropy" in record:
        extra = f"  anchor H {record['anchor_entropy']:.3f} [{record['anchor_min']:.3f}, {record['anchor_max']:.3f}]"
    print(f"[{record['arm']:>8}] epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
          f"test {record['test_accuracy']:6.2f}%  {record['epoch_seconds']:.1f}s{extra}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, report=_print_epoch) -> dict:
    """Runs (or resumes) the experiment in ``workdir`` and returns its summary (also in summary.json)."""
    os.makedirs(workdir, exist_ok=True)
    _check_workdir_config(workdir, config)
    dataset = data.load_dataset(config.dataset, config.data_dir, config.train_limit, config.test_limit)
    model = _model(config.model, dataset.num_classes)
    mean, std = input_pipeline.channel_statistics(dataset.train_images)
    template = create_train_state(model, dataset.train_images.shape[1:], config, config.seed)
    on_device = jax.device_put((dataset.train_images, dataset.train_labels)) if config.fused_epoch else None
    arms = arms_of(config.method)
    managers = {arm: ArmCheckpoints(workdir, arm) for arm in ["pretrain"] + arms}
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    done = {arm: manager.latest_epoch() for arm, manager in managers.items()}
    log.keep_only({arm: -1 if epoch is None else epoch for arm, epoch in done.items()})
    try:
        pretrain_done = done["pretrain"]
        if pretrain_done is None:
            state = template
            managers["pretrain"].save(0, state)  # the branch point exists even with no pre-training
            pretrain_done = 0
        else:
            state = managers["pretrain"].restore(pretrain_done, template)
        state = _run_phase(state, dataset, config, "pretrain", "ce", pretrain_done + 1, config.pretrain_epochs,
                           managers["pretrain"], log, mean, std, report, on_device)
        for arm in arms:
            if done[arm] == config.num_epochs:
                continue  # this arm has finished
            if done[arm] is not None:
                state = managers[arm].restore(done[arm], template)
                first = done[arm] + 1
            else:
                state = managers["pretrain"].restore(config.pretrain_epochs, template)
                if arm == "oat" and config.reset_momentum:
                    state = state.replace(opt_state=state.tx.init(state.params))
                first = config.pretrain_epochs + 1
            _run_phase(state, dataset, config, arm, arm, first, config.num_epochs, managers[arm], log, mean, std,
                       report, on_device)
    finally:
        for manager in managers.values():
            manager.close()
    summary = summarise(log.records(), arms, config.paper.to_dict())
    summary["dataset"] = {"name": dataset.name, "source": dataset.source, "train_samples": len(dataset.train_labels),
                          "test_samples": len(dataset.test_labels)}
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
