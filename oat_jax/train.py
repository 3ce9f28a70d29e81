"""Two-phase training: cross-entropy pre-training, then the cross-entropy and OAT arms, with Orbax
checkpoints every epoch and a resumable record of metrics.

``method="both"`` trains the shared pre-training once, saves it, continues it with cross-entropy to
``num_epochs`` (the baseline arm), and branches the OAT arm from the saved pre-trained state.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from oat_jax import config_schema, data, dispatch, distributed, input_pipeline, models, oat, sharding, steps
from oat_jax import state as state_lib
from oat_jax.checkpoints import ArmCheckpoints
from oat_jax.metrics_log import MetricsLog, summarise, write_json
from oat_jax.tensorboard import TensorBoardLog
from oat_jax.workdir import WorkdirBusy, hold_lock

# How many steps of each epoch have their batch anchor recorded, evenly spread.
_SAMPLED_STEPS = 5

# Fields that may differ between a run and its resumption without changing its results.
_COSMETIC_FIELDS = ("progress", "distributed", "steps_in_flight", "stall_timeout_seconds")

# With several processes, how many steps apart they agree on whether to stop (each agreement waits for the
# devices, so not at every step).
_STOP_CHECK_STEPS = 10


_STOP = threading.Event()


def request_stop() -> None:
    """Asks a running ``train_and_evaluate`` to stop at its next step (from a signal handler, say); it then
    raises KeyboardInterrupt with every finished epoch checkpointed."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def _stop_agreed() -> bool:
    """Whether any process was asked to stop; the same answer on all of them."""
    return distributed.any_process(_STOP.is_set())


def _stop_if_requested() -> None:
    if _stop_agreed():
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
    """Lockstep batches of K replicas, each in its own order: (K, B, ...) images, (K, B) labels and masks in
    host memory (place them with ``sharding.place_batch``)."""
    for parts in zip(*(input_pipeline.batches(images, labels, order, batch_size) for order in orders)):
        yield tuple(np.stack(arrays) for arrays in zip(*parts))


def evaluate_in_detail(states, dataset: data.Dataset, config, mean, std, decodes: tuple[str, ...] = ("ce", "oat")):
    """Per decoding, each replica's test accuracy (%) over every test sample, in batches of
    ``eval_batch_size``, and its share of predictions per class: ({decode: [accuracy of replica k]},
    {decode: (K, C) array of fractions})."""
    orders = [input_pipeline.eval_order(len(dataset.test_labels), seed, config.shuffle_eval)
              for seed in replica_seeds(config)]
    mesh = sharding.data_mesh()
    in_flight, counts = dispatch.InFlight(config.steps_in_flight), []
    batches = _replica_batches(dataset.test_images, dataset.test_labels, orders, config.eval_batch_size)
    for number, batch in enumerate(batches, 1):
        counts.append(steps.eval_step_replicas(states, *sharding.place_batch(batch, mesh), mean, std,
                                               variant=config.variant, decodes=decodes))
        in_flight.add(counts[-1], lambda number=number: f"evaluation (test batch {number})")
    in_flight.drain()
    counts = sharding.to_host(counts)
    total = len(dataset.test_labels)
    accuracies, shares = {}, {}
    for name in decodes:
        accuracies[name] = [100.0 * int(c) / total for c in np.sum([batch[name] for batch in counts], axis=0)]
        shares[name] = np.sum([batch[f"{name}_per_class"] for batch in counts], axis=0) / total
    return accuracies, shares


def evaluate(states, dataset: data.Dataset, config, mean, std,
             decodes: tuple[str, ...] = ("ce", "oat")) -> dict[str, list[float]]:
    """Test accuracy (%) of each replica over every test sample, in batches of ``eval_batch_size``,
    per decoding: {decode: [accuracy of replica k]}."""
    return evaluate_in_detail(states, dataset, config, mean, std, decodes)[0]


def _divergence_hint(objective, config):
    if objective == "oat" and config.variant == "paper":
        return ("the paper variant's anchor softmax(mean z) underflows when the outputs spread apart, and its "
                "targets 1/a - 1 explode; lower learning_rate or use variant='released'")
    return "the learning rate is likely too high for this model; lower learning_rate"


class EpochResult(NamedTuple):
    """What one training epoch of K replicas gives: the new states; each replica's mean loss (K,) and mean
    anchor (K, C); the largest OAT target magnitude |onehot(y) / a - 1| met (K,); and a few steps' anchors,
    (step numbers (S',), anchors (S', K, C)), for telemetry."""
    states: Any
    losses: np.ndarray
    anchors: np.ndarray
    max_targets: np.ndarray
    sampled_steps: np.ndarray
    sampled_anchors: np.ndarray


def _max_targets(anchors, labels, masks):
    """Largest |target| per replica: the label entries' 1/a_y - 1 (at least 1, the others' |-1|).
    anchors (S, K, C); labels and masks (S, K, B)."""
    floored = np.maximum(anchors, oat.ANCHOR_FLOOR)
    label_anchor = np.take_along_axis(floored, labels.astype(np.int64), axis=2)  # (S, K, B)
    largest = np.where(masks, 1.0 / label_anchor - 1.0, 0.0).max(axis=(0, 2))
    return np.maximum(largest, 1.0)


class EpochStopped(KeyboardInterrupt):
    """A stop request arrived part-way through an epoch: ``partial`` = (steps done, states, records) is what
    a rerun needs to finish the epoch as if nothing had happened."""

    def __init__(self, partial):
        super().__init__()
        self.partial = partial


_RECORD_NAMES = ("losses", "anchors", "weights", "labels", "masks")


def train_epoch(states, dataset, config, epoch, objective, mean, std, arm, on_device=None,
                resume=None) -> EpochResult:
    """One pass over the training set for every replica (see EpochResult). ``resume`` = (steps done,
    states, records) continues an epoch stopped part-way (EpochStopped), which this raises on a stop request.

    With ``on_device`` = (images, labels) already on the device, the epoch runs as one compiled loop
    (``steps.train_epoch_fused``); otherwise step by step from host memory, with a progress bar."""
    seeds = replica_seeds(config)
    orders = [input_pipeline.epoch_order(len(dataset.train_labels), seed, epoch) for seed in seeds]
    count = input_pipeline.num_batches(len(orders[0]), config.batch_size)
    if on_device is not None:
        padding = count * config.batch_size - len(orders[0])
        padded = np.stack([np.concatenate([order, np.full(padding, order[0])]) for order in orders])
        mesh = sharding.data_mesh()
        states, (losses, anchors, weights) = steps.train_epoch_fused(
            states, *on_device, padded.astype(np.int32), len(orders[0]), mean, std, objective=objective,
            batch_size=config.batch_size, variant=config.variant, anchor_gradient=config.anchor_gradient,
            anchor_groups=sharding.anchor_groups(config, mesh), batch_sharding=sharding.batch_sharding(mesh))
        shape = (len(seeds), count, config.batch_size)
        labels = np.swapaxes(dataset.train_labels[padded].reshape(shape), 0, 1)  # (S, K, B)
        real = np.arange(count * config.batch_size).reshape(count, 1, config.batch_size) < len(orders[0])
        masks = np.broadcast_to(real, labels.shape)
    else:
        done, records = 0, {name: [] for name in _RECORD_NAMES}
        if resume is not None:
            done, states, saved = resume
            records = {name: list(saved[name]) for name in _RECORD_NAMES}
        losses, anchors, weights, labels_seen, masks_seen = (records[name] for name in _RECORD_NAMES)
        progress = tqdm(total=count, initial=done, desc=f"{arm} epoch {epoch}/{config.num_epochs}", leave=False,
                        disable=None if config.progress and distributed.is_primary() else True, file=sys.stderr)
        mesh = sharding.data_mesh()
        groups = sharding.anchor_groups(config, mesh)
        check_every = 1 if jax.process_count() == 1 else _STOP_CHECK_STEPS
        in_flight = dispatch.InFlight(config.steps_in_flight)
        remaining = [order[done * config.batch_size:] for order in orders]
        for images, labels, masks in _replica_batches(dataset.train_images, dataset.train_labels, remaining,
                                                      config.batch_size):
            # The records below keep the host copies: no device work or transfer for them.
            placed = sharding.place_batch((images, labels, masks), mesh)
            states, loss, anchor = steps.train_step_replicas(states, *placed, mean, std,
                                                             objective=objective, variant=config.variant,
                                                             anchor_gradient=config.anchor_gradient,
                                                             anchor_groups=groups)
            losses.append(loss)
            in_flight.add(loss, lambda step=len(losses): f"training of arm '{arm}', epoch {epoch}, step {step} of "
                                                         f"{count}")
            anchors.append(anchor)
            weights.append(masks.sum(axis=1))
            labels_seen.append(labels)
            masks_seen.append(masks)
            progress.update()
            if len(losses) < count and (len(losses) - done) % check_every == 0 and _stop_agreed():
                progress.close()
                raise EpochStopped((len(losses), states, {name: np.stack(sharding.to_host(records[name]))
                                                          for name in _RECORD_NAMES}))
        progress.close()
        in_flight.drain()
        losses, anchors, weights = jnp.stack(losses), jnp.stack(anchors), np.stack(weights)
        labels, masks = np.stack(labels_seen), np.stack(masks_seen)
    losses = np.asarray(sharding.to_host(losses), dtype=np.float64)  # (steps, K)
    anchors = np.asarray(sharding.to_host(anchors), dtype=np.float64)  # (steps, K, C)
    bad = np.argwhere(~np.isfinite(losses) | ~np.isfinite(anchors).all(axis=-1))
    if bad.size:
        step, replica = bad[0]
        raise TrainingDiverged(
            f"training diverged: arm '{arm}', epoch {epoch}, step {step + 1} of {count}"
            + (f", seed {seeds[replica]}" if len(seeds) > 1 else "")
            + f" has a non-finite loss or anchor (loss {losses[step, replica]}, anchor entries "
            f"{np.round(anchors[step, replica, :4], 6).tolist()}...); {_divergence_hint(objective, config)}. "
            "The last good checkpoint is kept.")
    weights = np.asarray(sharding.to_host(weights), dtype=np.float64)  # (steps, K); on the device when fused
    mean_losses = np.sum(losses * weights, axis=0) / np.sum(weights, axis=0)
    mean_anchors = np.einsum("sk,skc->kc", weights, anchors) / np.sum(weights, axis=0)[:, None]
    sampled = np.unique(np.linspace(0, count - 1, min(count, _SAMPLED_STEPS)).round().astype(int))
    return EpochResult(states, mean_losses, mean_anchors, _max_targets(anchors, labels, masks), sampled + 1,
                       anchors[sampled])


def arms_of(method: str) -> list[str]:
    return {"both": ["ce", "oat"], "ce": ["ce"], "oat": ["oat"]}[method]


def _identity(config: dict) -> dict:
    """The fields that decide a run's results (a config's ``to_dict()`` or a saved config.json)."""
    return {k: v for k, v in config.items() if k not in _COSMETIC_FIELDS}


def _check_workdir(workdir, config) -> None:
    """Refuses a workdir holding a run (checkpoints or metrics) made with another config; reads only."""
    path = os.path.join(workdir, "config.json")
    trained = any(os.path.exists(os.path.join(workdir, name)) for name in ("checkpoints", "metrics.jsonl"))
    if not (trained and os.path.exists(path)):
        return  # nothing trained here yet: the new config takes the folder
    with open(path) as f:
        saved = _identity(json.load(f))
    current = _identity(config.to_dict())
    # A field the saved run predates had its default value then: only a different value is a change.
    defaults = config_schema.base_config().to_dict()
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k, defaults.get(k)) != current.get(k))
    if changed:
        raise WorkdirMismatch(
            f"workdir {workdir} holds a run with a different config (fields: {', '.join(changed)}); "
            f"rerun with the same config to resume it, or pass a new --workdir to start fresh")


def _record_config(workdir, config) -> None:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) == _identity(config.to_dict()):
                return  # a resumed run leaves its record as it was
    os.makedirs(workdir, exist_ok=True)
    write_json(path, _identity(config.to_dict()))


def _check_inputs(config, dataset: data.Dataset) -> None:
    """What the config asks of this dataset and model, checked before anything is written or built."""
    samples = len(dataset.train_labels)
    if config.batch_size > samples:
        raise config_schema.ConfigError(
            f"batch_size {config.batch_size} is larger than the training set ({samples} samples); "
            f"use --config.batch_size={samples} or less")
    shape = dataset.train_images.shape[1:]
    problem = models.input_problem(config.model, dataset.num_classes, config.dropout_rate, shape)
    if problem:
        raise config_schema.ConfigError(
            f"model '{config.model}' cannot take {'x'.join(map(str, shape))} images: {problem}; "
            + ("choose another --config.image_size" if config.image_size else "set --config.image_size to a size "
               "it takes"))


def _epoch_record(arm, epoch, seed, objective, result: EpochResult, k, accuracy, share, seconds) -> dict:
    """One line of metrics.jsonl: the epoch's loss and accuracy, and the telemetry of its anchors (the
    cross-entropy arms compute the same batch anchor, unused by their loss, to compare with OAT's)."""
    record = {"arm": arm, "epoch": epoch, "seed": seed, "objective": objective,
              "train_loss": float(result.losses[k]), "test_accuracy": accuracy, "epoch_seconds": seconds,
              "anchor": [float(a) for a in result.anchors[k]],
              "prediction_share": [float(p) for p in share],
              "step_anchors": [{"step": int(step), "anchor": [float(a) for a in anchor[k]]}
                               for step, anchor in zip(result.sampled_steps, result.sampled_anchors)]}
    record.update({f"anchor_{key}": float(value) for key, value in oat.anchor_statistics(result.anchors[k]).items()})
    if objective == "oat":
        record["max_target"] = float(result.max_targets[k])
    return record


def _run_phase(states, dataset, config, arm, objective, first_epoch, last_epoch, checkpoints, log, mean, std,
               report, on_device):
    """Trains epochs first_epoch..last_epoch of one arm, checkpointing and logging each (a line per seed).
    A stop request part-way through an epoch saves that epoch's progress first; the next run resumes it."""
    partials = checkpoints.partial
    for epoch in range(first_epoch, last_epoch + 1):
        _stop_if_requested()
        started = time.perf_counter()
        resume = partials.restore(epoch, states, _warn) if epoch == first_epoch else None
        try:
            result = train_epoch(states, dataset, config, epoch, objective, mean, std, arm, on_device, resume)
        except EpochStopped as stop:
            step, stopped_states, records = stop.partial
            partials.save(epoch, step, stopped_states, records)
            raise
        states = result.states
        accuracies, shares = evaluate_in_detail(states, dataset, config, mean, std, decodes=(objective,))
        seconds = time.perf_counter() - started
        records = [_epoch_record(arm, epoch, seed, objective, result, k, accuracies[objective][k],
                                 shares[objective][k], seconds)
                   for k, seed in enumerate(replica_seeds(config))]
        # The lines go first: an epoch logged but not checkpointed is dropped and redone on resume.
        for record in records:
            log.append(record)
        checkpoints.save(epoch, states)
        partials.clear()  # the epoch is complete: its part-way state is stale
        if distributed.is_primary():
            for record in records:
                report(record)
    return states


def _stall_hint(config) -> str:
    return (f"XLA:CPU's cross-device reductions can deadlock with many steps in flight: lower "
            f"--config.steps_in_flight (now {config.steps_in_flight}), or raise --config.stall_timeout_seconds "
            "if one step of this model takes longer; " if jax.default_backend() == "cpu" else
            "raise --config.stall_timeout_seconds if one step of this model takes longer; ")


def _warn(message: str) -> None:
    if distributed.is_primary():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _logged_epochs(records, seeds) -> dict:
    """Each arm's last epoch that metrics.jsonl records for every seed (0 for none)."""
    seen = {(r["arm"], r["epoch"], r["seed"]) for r in records}
    logged = {}
    for arm, epoch, _ in seen:
        if all((arm, epoch, seed) in seen for seed in seeds):
            logged[arm] = max(logged.get(arm, 0), epoch)
    return logged


def _resume_points(managers, template, config, arms, logged) -> dict:
    """Each arm's (last restorable epoch or None, its state or None), falling back past damaged checkpoints
    and past checkpoints ahead of the log (``logged``: each arm's last logged epoch). A finished arm is not
    restored; the pre-training only when something still needs it."""
    points = {}
    for arm in arms:
        latest = managers[arm].latest_epoch()
        finished = latest == config.num_epochs and logged.get(arm) == latest
        points[arm] = (latest, None) if finished else managers[arm].restore_latest(template, _warn,
                                                                                   logged.get(arm, 0))
    pretrain_latest = managers["pretrain"].latest_epoch()
    behind = (pretrain_latest or 0) > logged.get("pretrain", 0)
    if any(epoch is None for epoch, _ in points.values()) or (pretrain_latest or 0) < config.pretrain_epochs or behind:
        points["pretrain"] = managers["pretrain"].restore_latest(template, _warn, logged.get("pretrain", 0))
    else:
        points["pretrain"] = (pretrain_latest, None)
    return points


def _print_epoch(record):
    extra = ""
    if "anchor_entropy" in record:
        extra = f"  anchor H {record['anchor_entropy']:.3f} [{record['anchor_min']:.3f}, {record['anchor_max']:.3f}]"
    print(f"[{record['arm']:>8} seed {record['seed']}] epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
          f"test {record['test_accuracy']:6.2f}%  {record['epoch_seconds']:.1f}s{extra}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, report=_print_epoch) -> dict:
    """Runs (or resumes) the experiment in ``workdir`` and returns its summary (also in summary.json).
    One run per workdir at a time: WorkdirBusy while another holds it (``workdir.hold_lock``)."""
    with contextlib.ExitStack() as lock:  # the workdir's lock, once taken, is released however the run ends
        return _train_and_evaluate(config, workdir, report, lock)


def _train_and_evaluate(config, workdir, report, lock: contextlib.ExitStack) -> dict:
    _STOP.clear()  # a stop asked of an earlier run in this process does not carry over
    distributed.initialize(config)  # several processes: before anything runs on a device
    mesh = sharding.data_mesh()
    sharding.check_batch_sizes(config, mesh)
    dispatch.WATCHDOG.configure(config.stall_timeout_seconds if mesh is not None else 0, _stall_hint(config))
    # Every check that can refuse the run comes before the first file is written.
    pretrained = state_lib.pretrained_path(config)
    _check_workdir(workdir, config)
    dataset = data.load_dataset(config.dataset, config.data_dir, config.train_limit, config.test_limit,
                                image_size=config.image_size)
    _check_inputs(config, dataset)
    distributed.barrier("oat_jax:checked")
    refused = None
    if distributed.is_primary():  # the other processes share the workdir by design
        try:
            lock.enter_context(hold_lock(workdir))
            _check_workdir(workdir, config)  # again, locked: another run may have trained here since the check
        except (WorkdirBusy, WorkdirMismatch) as error:
            refused = error
    if distributed.any_process(refused is not None):  # all stop together, none left waiting at a barrier
        raise refused or WorkdirBusy(f"workdir {workdir} was refused by process 0 (its error says why)")
    if distributed.is_primary():
        _record_config(workdir, config)
    distributed.barrier("oat_jax:workdir-recorded")
    model = cached_model(config.model, dataset.num_classes, config.dropout_rate)
    mean, std = normalisation_statistics(config, dataset)
    template = create_replicas(model, dataset.train_images.shape[1:], config, pretrained)
    # A fused epoch gathers its batches on the devices: every device holds the whole training set.
    on_device = (sharding.place_states((dataset.train_images, dataset.train_labels), mesh) if config.fused_epoch
                 else None)
    arms = arms_of(config.method)
    managers = {arm: ArmCheckpoints(workdir, arm) for arm in ["pretrain"] + arms}
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), write=distributed.is_primary())
    try:
        points = _resume_points(managers, template, config, arms,
                                _logged_epochs(log.records(), replica_seeds(config)))
        # Metrics of epochs past the checkpoints (an epoch logged but not saved, a damaged checkpoint) are redone.
        log.keep_only({arm: -1 if epoch is None else epoch for arm, (epoch, _) in points.items()})
        if distributed.is_primary():
            log.mirror = TensorBoardLog(workdir, log.records(), replica_seeds(config))
        pretrain_done, state = points["pretrain"]
        if pretrain_done is None:
            state = template
            managers["pretrain"].save(0, state)  # the branch point exists even with no pre-training
            pretrain_done = 0
        state = _run_phase(state, dataset, config, "pretrain", "ce", pretrain_done + 1, config.pretrain_epochs,
                           managers["pretrain"], log, mean, std, report, on_device)
        for arm in arms:
            done, arm_state = points[arm]
            if done == config.num_epochs:
                continue  # this arm has finished
            if done is not None:
                state, first = arm_state, done + 1
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
        if log.mirror is not None:
            log.mirror.close()
    summary = summarise(log.records(), arms, config.paper.to_dict())
    summary["dataset"] = {"name": dataset.name, "source": dataset.source, "train_samples": len(dataset.train_labels),
                          "test_samples": len(dataset.test_labels)}
    if distributed.is_primary():
        write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
