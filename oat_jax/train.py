"""Two-phase training: cross-entropy pre-training, then the cross-entropy and OAT arms, with Orbax
checkpoints every epoch and a resumable record of metrics.

``method="both"`` trains the shared pre-training once, saves it, continues it with cross-entropy to
``num_epochs`` (the baseline arm), and branches the OAT arm from the saved pre-trained state.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from oat_jax import data, input_pipeline, oat, steps
from oat_jax import state as state_lib
from oat_jax.checkpoints import ArmCheckpoints
from oat_jax.metrics_log import MetricsLog, summarise, write_json

# Fields that may differ between a run and its resumption without changing its results.
_COSMETIC_FIELDS = ("progress",)


_STOP = threading.Event()


def request_stop() -> None:
    """Asks a running ``train_and_evaluate`` to stop at its next step (from a signal handler, say); it then
    raises KeyboardInterrupt with every finished epoch checkpointed."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def _stop_if_requested() -> None:
    if _STOP.is_set():
        raise KeyboardInterrupt


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the message names arm, epoch and step and the likely cause."""


class WorkdirMismatch(RuntimeError):
    """The workdir holds a run made with another configuration."""


# Kept here too: the benchmarks and tests build states through ``train``.
cached_model = state_lib.cached_model
create_train_state = state_lib.create_train_state
create_replicas = state_lib.create_replicas
replica_seeds = state_lib.replica_seeds

# ImageNet's per-channel mean and standard deviation, for models pretrained on it (torchvision's values).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalisation_statistics(config, dataset: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel mean and std that the steps standardise images with."""
    if config.normalisation == "imagenet":
        if dataset.train_images.shape[-1] != 3:
            raise data.DatasetError(f"normalisation 'imagenet' needs RGB images; {dataset.name} has "
                                    f"{dataset.train_images.shape[-1]} channel(s)")
        return IMAGENET_MEAN, IMAGENET_STD
    return input_pipeline.channel_statistics(dataset.train_images)


def _replica_batches(images, labels, orders, batch_size):
    """Lockstep batches of K replicas, each in its own order: (K, B, ...) images, (K, B) labels and masks."""
    for parts in zip(*(input_pipeline.batches(images, labels, order, batch_size) for order in orders)):
        yield tuple(np.stack(arrays) for arrays in zip(*parts))


def evaluate(states, dataset: data.Dataset, config, mean, std,
             decodes: tuple[str, ...] = ("ce", "oat")) -> dict[str, list[float]]:
    """Test accuracy (%) of each replica over every test sample, in batches of ``eval_batch_size``,
    per decoding: {decode: [accuracy of replica k]}."""
    orders = [input_pipeline.eval_order(len(dataset.test_labels), seed, config.shuffle_eval)
              for seed in replica_seeds(config)]
    counts = [steps.eval_step_replicas(states, images, labels, masks, mean, std, variant=config.variant,
                                       decodes=decodes)
              for images, labels, masks in _replica_batches(dataset.test_images, dataset.test_labels, orders,
                                                            config.eval_batch_size)]
    totals = {name: np.sum([batch[name] for batch in jax.device_get(counts)], axis=0) for name in decodes}
    return {name: [100.0 * int(c) / len(dataset.test_labels) for c in totals[name]] for name in decodes}


def _divergence_hint(objective, config):
    if objective == "oat" and config.variant == "paper":
        return ("the paper variant's anchor softmax(mean z) underflows when the outputs spread apart, and its "
                "targets 1/a - 1 explode; lower learning_rate or use variant='released'")
    return "the learning rate is likely too high for this model; lower learning_rate"


def train_epoch(states, dataset, config, epoch, objective, mean, std, arm, on_device=None):
    """One pass over the training set for every replica. Returns the new states, each replica's mean loss
    (K,) and mean anchor (K, C) over the epoch.

    With ``on_device`` = (images, labels) already on the device, the epoch runs as one compiled loop
    (``steps.train_epoch_fused``); otherwise step by step from host memory, with a progress bar."""
    seeds = replica_seeds(config)
    orders = [input_pipeline.epoch_order(len(dataset.train_labels), seed, epoch) for seed in seeds]
    count = input_pipeline.num_batches(len(orders[0]), config.batch_size)
    if on_device is not None:
        padding = count * config.batch_size - len(orders[0])
        padded = np.stack([np.concatenate([order, np.full(padding, order[0])]) for order in orders])
        states, (losses, anchors, weights) = steps.train_epoch_fused(
            states, *on_device, padded.astype(np.int32), len(orders[0]), mean, std, objective=objective,
            batch_size=config.batch_size, variant=config.variant, anchor_gradient=config.anchor_gradient)
    else:
        losses, anchors, weights = [], [], []
        progress = tqdm(total=count, desc=f"{arm} epoch {epoch}/{config.num_epochs}", leave=False,
                        disable=None if config.progress else True, file=sys.stderr)
        for images, labels, masks in _replica_batches(dataset.train_images, dataset.train_labels, orders,
                                                      config.batch_size):
            states, loss, anchor = steps.train_step_replicas(states, images, labels, masks, mean, std,
                                                             objective=objective, variant=config.variant,
                                                             anchor_gradient=config.anchor_gradient)
            losses.append(loss)
            anchors.append(anchor)
            weights.append(masks.sum(axis=1))
            progress.update()
            _stop_if_requested()
        progress.close()
        losses, anchors, weights = jnp.stack(losses), jnp.stack(anchors), np.stack(weights)
    losses = np.asarray(jax.device_get(losses), dtype=np.float64)  # (steps, K)
    bad = np.argwhere(~np.isfinite(losses))
    if bad.size:
        step, replica = bad[0]
        raise TrainingDiverged(
            f"training diverged: arm '{arm}', epoch {epoch}, step {step + 1} of {count}"
            + (f", seed {seeds[replica]}" if len(seeds) > 1 else "")
            + f" has a non-finite loss ({losses[step, replica]}); {_divergence_hint(objective, config)}. "
            "The last good checkpoint is kept.")
    weights = np.asarray(jax.device_get(weights), dtype=np.float64)  # (steps, K)
    anchors = np.asarray(jax.device_get(anchors), dtype=np.float64)  # (steps, K, C)
    mean_losses = np.sum(losses * weights, axis=0) / np.sum(weights, axis=0)
    mean_anchors = np.einsum("sk,skc->kc", weights, anchors) / np.sum(weights, axis=0)[:, None]
    return states, mean_losses, mean_anchors


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


def _run_phase(states, dataset, config, arm, objective, first_epoch, last_epoch, checkpoints, log, mean, std,
               report, on_device):
    """Trains epochs first_epoch..last_epoch of one arm, checkpointing and logging each (a line per seed)."""
    for epoch in range(first_epoch, last_epoch + 1):
        _stop_if_requested()
        started = time.perf_counter()
        states, losses, mean_anchors = train_epoch(states, dataset, config, epoch, objective, mean, std, arm,
                                                   on_device)
        accuracies = evaluate(states, dataset, config, mean, std, decodes=(objective,))[objective]
        seconds = time.perf_counter() - started
        records = []
        for k, seed in enumerate(replica_seeds(config)):
            record = {"arm": arm, "epoch": epoch, "seed": seed, "objective": objective,
                      "train_loss": float(losses[k]), "test_accuracy": accuracies[k], "epoch_seconds": seconds}
            if objective == "oat":
                record.update({f"anchor_{key}": float(value)
                               for key, value in oat.anchor_statistics(mean_anchors[k]).items()})
            records.append(record)
        # The lines go first: an epoch logged but not checkpointed is dropped and redone on resume.
        for record in records:
            log.append(record)
        checkpoints.save(epoch, states)
        for record in records:
            report(record)
    return states


def _print_epoch(record):
    extra = ""
    if "anchor_entropy" in record:
        extra = f"  anchor H {record['anchor_entropy']:.3f} [{record['anchor_min']:.3f}, {record['anchor_max']:.3f}]"
    print(f"[{record['arm']:>8} seed {record['seed']}] epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
          f"test {record['test_accuracy']:6.2f}%  {record['epoch_seconds']:.1f}s{extra}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, report=_print_epoch) -> dict:
    """Runs (or resumes) the experiment in ``workdir`` and returns its summary (also in summary.json)."""
    _STOP.clear()  # a stop asked of an earlier run in this process does not carry over
    pretrained = state_lib.pretrained_path(config)  # a missing weights file is reported before anything is written
    os.makedirs(workdir, exist_ok=True)
    _check_workdir_config(workdir, config)
    dataset = data.load_dataset(config.dataset, config.data_dir, config.train_limit, config.test_limit,
                                image_size=config.image_size)
    model = cached_model(config.model, dataset.num_classes, config.dropout_rate)
    mean, std = normalisation_statistics(config, dataset)
    template = create_replicas(model, dataset.train_images.shape[1:], config, pretrained)
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
                    state = state.replace(opt_state=jax.vmap(state.tx.init)(state.params))
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
