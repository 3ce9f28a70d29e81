"""The training loop: a shared cross-entropy pre-training, then every arm of the experiment (an objective of
``oat_jax.objectives``, ``config.arms``) continued from it to ``num_epochs``, with Orbax checkpoints and a
line of ``metrics.jsonl`` per arm, epoch and seed.

The pre-training is trained once and saved; the arm named "ce" continues its optimiser state, every other
arm starts from the saved pre-trained state (with a fresh optimiser under ``reset_momentum``). A run resumes
exactly from where it stopped, part-way through an epoch included.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from oat_jax import dispatch, distributed, oat, objectives, sharding, steps
from oat_jax import workdir as workdir_lib
from oat_jax.checkpoints import ArmCheckpoints, ResumePoint
from oat_jax.data import longtail
from oat_jax.experiment import Experiment
from oat_jax.tensorboard import TensorBoardLog
from oat_jax.workdir import MetricsLog, WorkdirBusy, WorkdirMismatch, hold_lock, summarise, write_json

PRETRAIN = "pretrain"  # the arm name of the shared pre-training

# With several processes, how many steps apart they agree on whether to stop (each agreement waits for the
# devices, so not at every step).
_STOP_CHECK_STEPS = 10

_STOP = threading.Event()

# Seconds this process has spent tracing and compiling (JAX's own events): an epoch's share is logged beside
# its time, so a first epoch's compilation is not read as a slow epoch.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compiling = [0.0]


def _count_compilation(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compiling[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def request_stop() -> None:
    """Asks ``train_and_evaluate`` (running, or next to run in this process) to stop at its next step (from a
    signal handler, say); it then raises KeyboardInterrupt with its progress checkpointed, or, before its first
    epoch is saved, StoppedBeforeTraining with the workdir as it found it."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def _stop_agreed() -> bool:
    """Whether any process was asked to stop; the same answer on all of them."""
    return distributed.any_process(_STOP.is_set())


class StoppedBeforeTraining(KeyboardInterrupt):
    """A stop request (Ctrl-C, SIGTERM) that came before the run's first epoch was saved: the workdir is as the
    run found it, nothing to resume. The message says so in one line."""


def _workdir_found(workdir: str):
    """What ``_put_back`` needs to restore ``workdir`` as found now: None when it holds a run (checkpoints or
    metrics, which a stop leaves to resume), else (the nearest folder of its path that exists, the names in it
    when that is the workdir, the bytes of a config.json there)."""
    path = os.path.abspath(workdir)
    if any(os.path.lexists(os.path.join(path, name)) for name in (workdir_lib.CHECKPOINTS_DIR,
                                                                  workdir_lib.METRICS_FILE)):
        return None
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if existing != path:
        return existing, set(), None
    if not os.path.isdir(path):
        return None  # not a folder: the run is refused before it writes
    config, saved = os.path.join(path, workdir_lib.CONFIG_FILE), None
    if os.path.isfile(config):
        with open(config, "rb") as f:
            saved = f.read()
    return existing, set(os.listdir(path)), saved


def _put_back(workdir: str, found) -> None:
    """Removes what the run wrote in ``workdir`` since ``_workdir_found`` saw it: the folders it made (up to the
    nearest that existed), or in a folder that was there, the entries it added and config.json as it was."""
    path = os.path.abspath(workdir)
    existing, names, config = found
    if existing != path:
        shutil.rmtree(path, ignore_errors=True)
        folder = os.path.dirname(path)
        with contextlib.suppress(OSError):  # the folders above it that the run made, while empty
            while folder != existing:
                os.rmdir(folder)
                folder = os.path.dirname(folder)
        return
    for name in set(os.listdir(path)) - names:
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(entry)
    if config is not None:
        with workdir_lib.replacing(os.path.join(path, workdir_lib.CONFIG_FILE)) as tmp, open(tmp, "wb") as f:
            f.write(config)


def _put_back_on_stop(workdir: str, found):
    """An exit callback for the workdir's ExitStack (unwound before the lock is released): a stop that ends the
    run before it has logged anything (an epoch, a divergence) or saved an epoch part-way is nothing to resume,
    so a workdir that held no run is put back as found (by process 0, which writes the files) and the stop
    raised as StoppedBeforeTraining."""
    def on_exit(kind, error, traceback) -> bool:
        if (found is None or not isinstance(error, KeyboardInterrupt)
                or isinstance(error, (EpochStopped, StoppedBeforeTraining))
                or workdir_lib.read_lines(os.path.join(workdir, workdir_lib.METRICS_FILE))):
            return False
        if distributed.is_primary():
            _put_back(workdir, found)
        raise StoppedBeforeTraining(f"interrupted before the first epoch was saved; nothing was kept in {workdir}")
    return on_exit


class TrainingDiverged(RuntimeError):
    """The shared pre-training diverged (a non-finite loss or anchor), so no arm can start from it; the message
    names epoch and step and the likely cause. A diverged arm only ends itself (``_record_divergence``)."""


class EpochStopped(KeyboardInterrupt):
    """A stop request arrived part-way through an epoch: ``point`` is where a rerun resumes it."""

    def __init__(self, point: ResumePoint):
        super().__init__()
        self.point = point


def _divergence_hint(objective, config):
    if objectives.get(objective).uses_anchor and (objectives.get(objective).variant or config.variant) == "paper":
        return ("the paper variant's anchor softmax(mean z) underflows when the outputs spread apart, and its "
                "targets 1/a - 1 explode; lower learning_rate or use variant='released'")
    return "the learning rate is likely too high for this model; lower learning_rate"


def train_epoch(exp: Experiment, states, epoch: int, objective: str, arm: str, resume: ResumePoint | None = None):
    """One pass over the training set for every replica: (states, metrics on the host, ``steps.new_metrics``'
    keys; ``divergence`` reads whether a replica diverged). ``resume`` continues an epoch stopped part-way,
    which this raises as EpochStopped on a stop request.

    With the training set on the devices (``fused_epoch``) the epoch runs as one compiled loop; otherwise
    step by step from host memory, with a progress bar. Both run the same step on the same batches."""
    config, count = exp.config, exp.steps_per_epoch()
    orders, sample_at = exp.epoch_orders(epoch), steps.sampled_steps(count)
    done, metrics = (resume.steps_done, resume.metrics) if resume else (0, exp.new_metrics())
    states = resume.states if resume else states
    metrics = sharding.place_states(metrics, exp.mesh)
    if exp.on_device is not None:
        states, metrics = exp.train_steps_on_device(states, metrics, *exp.on_device, orders, done,
                                                    len(exp.dataset.train_labels), sample_at, objective=objective,
                                                    num_steps=count - done)
    else:
        progress = tqdm(total=count, initial=done, desc=f"{arm} epoch {epoch}/{config.num_epochs}", leave=False,
                        disable=None if config.progress and distributed.is_primary() else True, file=sys.stderr)
        check_every = 1 if jax.process_count() == 1 else _STOP_CHECK_STEPS
        in_flight = dispatch.InFlight(config.steps_in_flight)
        for number, batch in enumerate(exp.train_batches(orders, done), done + 1):
            states, metrics = exp.train_step(states, metrics, *exp.place(batch), sample_at, objective=objective)
            in_flight.add(metrics["steps"], lambda number=number: f"training of arm '{arm}', epoch {epoch}, step "
                                                                  f"{number} of {count}")
            progress.update()
            if number < count and (number - done) % check_every == 0 and _stop_agreed():
                progress.close()
                raise EpochStopped(ResumePoint(epoch - 1, number, states, metrics))
        progress.close()
        in_flight.drain()
    metrics = sharding.to_host(metrics)
    return states, metrics


def diverged_replicas(metrics) -> list[int]:
    """The replicas whose epoch ``metrics`` show a non-finite loss or anchor."""
    return [int(k) for k in np.flatnonzero(metrics["first_bad_step"] >= 0)]


def divergence(exp: Experiment, metrics, arm: str, epoch: int, objective: str, k: int) -> str:
    """Why replica ``k`` diverged in this epoch (a non-finite loss or anchor), naming arm, epoch, step, seed
    and the likely cause."""
    return (f"training diverged: arm '{arm}', epoch {epoch}, step {metrics['first_bad_step'][k] + 1} of "
            f"{exp.steps_per_epoch()}" + (f", seed {exp.seeds[k]}" if len(exp.seeds) > 1 else "")
            + f" has a non-finite loss or anchor (loss {metrics['bad_loss'][k]}, anchor entries "
            f"{np.round(metrics['bad_anchor'][k, :4], 6).tolist()}...); {_divergence_hint(objective, exp.config)}")


def _held_out_counts(exp: Experiment, states, batches, train_anchors, what: str, **options) -> dict:
    """``exp.eval_step``'s counts over every batch of ``batches`` (a held-out set), summed, on the host."""
    in_flight, counts = dispatch.InFlight(exp.config.steps_in_flight), []
    train_anchors = sharding.place_states(np.asarray(train_anchors, np.float32), exp.mesh)
    for number, batch in enumerate(batches, 1):
        counts.append(exp.eval_step(states, *exp.place(batch), train_anchors, **options))
        in_flight.add(counts[-1], lambda number=number: f"evaluation ({what} batch {number})")
    in_flight.drain()
    counts = sharding.to_host(counts)
    return {key: np.sum([batch[key] for batch in counts], axis=0) for key in counts[0]}


def _uniform_anchors(exp: Experiment) -> np.ndarray:
    return np.full((len(exp.seeds), exp.num_classes), 1.0 / exp.num_classes, np.float32)


def evaluate_in_detail(exp: Experiment, states, decodes: tuple[str, ...] = ("argmax", "anchor"),
                       batch_size: int | None = None, variant: str | None = None, train_anchors=None):
    """Per decoding (of ``steps.DECODES``: "argmax", "anchor" (OAT's, with the test batch's anchor of
    ``variant``, default the config's), "single", "train_anchor" (with ``train_anchors`` (K, C))), each
    replica's test accuracy (%) over every test sample, in batches of ``batch_size`` (default
    ``eval_batch_size``), and its share of predictions per class:
    ({decode: [accuracy of replica k]}, {decode: (K, C) array of fractions})."""
    totals = _held_out_counts(exp, states, exp.test_batches(batch_size or exp.config.eval_batch_size),
                              _uniform_anchors(exp) if train_anchors is None else train_anchors, "test",
                              decodes=decodes, variant=variant or exp.config.variant)
    total = len(exp.dataset.test_labels)
    accuracies = {name: [100.0 * int(c) / total for c in totals[name]] for name in decodes}
    shares = {name: totals[f"{name}_per_class"] / total for name in decodes}
    recalls = {name: _recalls(totals[f"{name}_correct_per_class"], exp.dataset.test_labels, exp.num_classes)
               for name in decodes}
    return Evaluation(accuracies, shares, recalls)


class Evaluation(NamedTuple):
    """A held-out set's figures per decoding: each replica's accuracy (%), its share of predictions per
    class (K, C), and its accuracy (%) on each true class (K, C; NaN for a class with no sample)."""
    accuracies: dict[str, list[float]]
    shares: dict[str, np.ndarray]
    recalls: dict[str, np.ndarray]


def _recalls(correct_per_class: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, 100.0 * correct_per_class / counts, np.nan)


def evaluate_validation(exp: Experiment, states, objective: str) -> list[dict]:
    """Each replica's figures on the validation split by ``objective``'s own decoding: its accuracy (%), its
    balanced accuracy (the mean of the classes' accuracies, %) and its mean loss there (OAT's with each
    validation batch's anchor)."""
    decode = objectives.get(objective).decode
    totals = _held_out_counts(exp, states, exp.validation_batches(exp.config.eval_batch_size), _uniform_anchors(exp),
                              "validation", decodes=(decode,), objective=objective,
                              variant=objectives.get(objective).variant or exp.config.variant)
    labels = exp.dataset.validation_labels
    recalls = _recalls(totals[f"{decode}_correct_per_class"], labels, exp.num_classes)
    return [{"val_accuracy": 100.0 * int(correct) / len(labels), "val_balanced_accuracy": float(np.nanmean(recall)),
             "val_loss": float(loss) / len(labels)}
            for correct, recall, loss in zip(totals[decode], recalls, totals["loss_sum"])]


def evaluate(exp: Experiment, states, decodes: tuple[str, ...] = ("argmax", "anchor"),
             batch_size: int | None = None, variant: str | None = None) -> dict[str, list[float]]:
    """Test accuracy (%) of each replica per decoding: {decode: [accuracy of replica k]}."""
    return evaluate_in_detail(exp, states, decodes, batch_size, variant).accuracies


# metrics.jsonl's names of the decodings every epoch is evaluated with (README, "Decoding").
_DECODE_NAMES = {"anchor": "batch", "single": "single", "train_anchor": "train_anchor", "argmax": "uniform"}


def _class_figures(exp: Experiment, recalls: np.ndarray, anchor: list[float]) -> dict:
    """An epoch's figures by class: the test accuracy of each class (by the arm's decoding), their mean (the
    balanced accuracy) and the means over the classes in thirds by training frequency; on an imbalanced
    training set, also the training prior and its correlation with the epoch's mean anchor."""
    figures = {"test_accuracy_per_class": [None if np.isnan(r) else float(r) for r in recalls],
               "test_balanced_accuracy": float(np.nanmean(recalls))}
    for group, classes in longtail.frequency_groups(exp.prior).items():
        figures[f"test_accuracy_{group}"] = float(np.nanmean(recalls[classes])) if len(classes) else None
    if np.ptp(exp.prior) > 1e-3 / exp.num_classes:  # a prior that is not (nearly) uniform
        figures["train_prior"] = [float(p) for p in exp.prior]
        figures["anchor_prior_correlation"] = float(np.corrcoef(anchor, exp.prior)[0, 1])
    return figures


def _epoch_records(exp: Experiment, arm, epoch, objective, metrics, evaluation: Evaluation, seconds,
                   compile_seconds) -> list[dict]:
    """The lines of metrics.jsonl of one epoch, one per seed: its loss and accuracy (by the objective's own
    decoding, and by each of ``_DECODE_NAMES``), and the telemetry of its anchors (the cross-entropy arms
    compute the same batch anchor, unused by their loss, to compare)."""
    sampled, first = np.unique(steps.sampled_steps(exp.steps_per_epoch()), return_index=True)
    decode = objectives.get(objective).decode
    records = []
    for k, seed in enumerate(exp.seeds):
        rows = float(metrics["rows"][k])
        anchor = metrics["anchor_sum"][k] / rows
        accuracies = evaluation.accuracies
        record = {"arm": arm, "epoch": epoch, "seed": seed, "objective": objective,
                  "train_loss": float(metrics["loss_sum"][k] / rows), "test_accuracy": accuracies[decode][k],
                  "test_accuracy_by_decode": {name: accuracies[key][k] for key, name in _DECODE_NAMES.items()},
                  "epoch_seconds": seconds, "compile_seconds": compile_seconds, "anchor": [float(a) for a in anchor],
                  "prediction_share": [float(p) for p in evaluation.shares[decode][k]],
                  "step_anchors": [{"step": int(step) + 1,
                                    "anchor": [float(a) for a in metrics["sampled_anchors"][k, i]]}
                                   for step, i in zip(sampled, first)]}
        record.update({f"anchor_{key}": float(value) for key, value in oat.anchor_statistics(anchor).items()})
        if objectives.get(objective).uses_anchor:
            record["max_target"] = float(metrics["max_target"][k])
        records.append(record)
    return records


def _run_arm(exp: Experiment, states, arm, objective, first_epoch, checkpoints, log, report,
             resume: ResumePoint | None = None):
    """Trains epochs first_epoch..(the arm's last) of one arm, checkpointing and logging each (a line per
    seed), and returns the last states (None when the arm diverged). A stop request part-way through an epoch
    saves its progress first; the next run resumes it."""
    last = exp.config.pretrain_epochs if arm == PRETRAIN else exp.config.num_epochs
    variant = objectives.get(objective).variant or exp.config.variant
    # Replicas of this arm that diverged earlier: they compute on (on NaNs) but log nothing more.
    ended = {exp.seeds.index(event["seed"]) for event in log.divergences()
             if event["arm"] == arm and event["seed"] in exp.seeds}
    part_way = resume if resume is not None and resume.steps_done else None
    for epoch in range(first_epoch, last + 1):
        if _stop_agreed():
            raise KeyboardInterrupt
        started, compiled = time.perf_counter(), _compiling[0]
        try:
            states, metrics = train_epoch(exp, states, epoch, objective, arm,
                                          part_way if epoch == first_epoch else None)
        except EpochStopped as stop:
            checkpoints.save(epoch, stop.point.states, stop.point.steps_done, stop.point.metrics)
            raise
        diverged = [k for k in diverged_replicas(metrics) if k not in ended]
        if diverged and arm == PRETRAIN:  # nothing can branch from it
            raise TrainingDiverged(divergence(exp, metrics, arm, epoch, objective, diverged[0])
                                   + ". The last good checkpoint is kept.")
        if diverged:  # those seeds end here; the arm's other seeds train on
            _record_divergence(exp, log, arm, epoch, objective, metrics, diverged)
            ended.update(diverged)
            if len(ended) == len(exp.seeds):
                return None
        train_anchors = metrics["anchor_sum"] / metrics["rows"][:, None]
        evaluation = evaluate_in_detail(exp, states, steps.DECODES, variant=variant, train_anchors=train_anchors)
        validation = evaluate_validation(exp, states, objective) if exp.has_validation else None
        records = _epoch_records(exp, arm, epoch, objective, metrics, evaluation,
                                 time.perf_counter() - started, _compiling[0] - compiled)
        for k, record in enumerate(records):
            record.update(_class_figures(exp, evaluation.recalls[objectives.get(objective).decode][k],
                                         record["anchor"]))
            if validation is not None:
                record.update(validation[k])
        records = [record for k, record in enumerate(records) if k not in ended]
        # The lines go first: an epoch logged but not checkpointed is dropped and redone on resume.
        for record in records:
            log.append(record)
        checkpoints.save(epoch, states)
        if distributed.is_primary():
            for record in records:
                report(record)
    return states


def _record_divergence(exp: Experiment, log, arm, epoch, objective, metrics, replicas) -> None:
    """Ends the diverged ``replicas`` of an arm: a line per seed in metrics.jsonl (``workdir.DIVERGED``), which
    a rerun reads as that seed's end. The arm's other seeds and the other arms go on."""
    for k in replicas:
        message = divergence(exp, metrics, arm, epoch, objective, k)
        log.append({"arm": arm, "epoch": epoch, "seed": exp.seeds[k], "objective": objective,
                    "event": workdir_lib.DIVERGED, "step": int(metrics["first_bad_step"][k]) + 1,
                    "steps_per_epoch": exp.steps_per_epoch(), "loss": float(metrics["bad_loss"][k]),
                    "message": message})
        alone = len(exp.seeds) == 1 or len(replicas) == len(exp.seeds)
        _warn(f"{message}. " + (f"Arm '{arm}' stops here, its last good checkpoint kept; the other arms go on."
                                if alone else f"Seed {exp.seeds[k]} of arm '{arm}' stops here; its other seeds "
                                              "and the other arms go on."))


def _stall_hint(config) -> str:
    return (f"XLA:CPU's cross-device reductions can deadlock with many steps in flight: lower "
            f"--config.steps_in_flight (now {config.steps_in_flight}), or raise --config.stall_timeout_seconds "
            "if one step of this model takes longer; " if jax.default_backend() == "cpu" else
            "raise --config.stall_timeout_seconds if one step of this model takes longer; ")


def _warn(message: str) -> None:
    if distributed.is_primary():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _ended_seeds(divergences) -> dict[str, dict[int, int]]:
    """Per arm, the seeds that diverged and the epoch each diverged in."""
    ended: dict[str, dict[int, int]] = {}
    for event in divergences:
        ended.setdefault(event["arm"], {})[event["seed"]] = event["epoch"]
    return ended


def _logged_epochs(records, seeds, ended: dict | None = None) -> dict:
    """Each arm's last epoch that metrics.jsonl records for every seed still training then (0 for none): a
    seed in ``ended`` (``_ended_seeds``) is not waited for from the epoch it diverged in."""
    seen = {(r["arm"], r["epoch"], r["seed"]) for r in records}
    logged = {}
    for arm, epoch, _ in seen:
        stopped = (ended or {}).get(arm, {})
        if all((arm, epoch, seed) in seen for seed in seeds if stopped.get(seed, epoch + 1) > epoch):
            logged[arm] = max(logged.get(arm, 0), epoch)
    return logged


def _resume_points(managers, exp: Experiment, logged, diverged) -> dict:
    """Each arm's ResumePoint or None, falling back past damaged checkpoints and past checkpoints ahead of
    the log (``logged``: each arm's last logged epoch). A finished arm, or one in ``diverged``, is not
    restored (its point holds no states); the pre-training only when something still needs it."""
    config, points = exp.config, {}
    for arm in exp.arms:
        latest = managers[arm].latest_epoch()
        finished = latest == config.num_epochs and logged.get(arm) == latest
        if arm in diverged:
            finished, latest = True, latest or config.pretrain_epochs
        points[arm] = (ResumePoint(latest, 0, None, None) if finished else
                       managers[arm].restore_latest(exp.template, _warn,
                                                    max(logged.get(arm, 0), config.pretrain_epochs)))
    pretrained = managers[PRETRAIN].latest_epoch() or 0
    if (any(point is None for point in points.values()) or pretrained < config.pretrain_epochs
            or pretrained > logged.get(PRETRAIN, 0)):
        points[PRETRAIN] = managers[PRETRAIN].restore_latest(exp.template, _warn, logged.get(PRETRAIN, 0))
    else:
        points[PRETRAIN] = ResumePoint(pretrained, 0, None, None)
    return points


def _finished_summary(workdir, exp: Experiment, logged, diverged) -> dict | None:
    """The summary of a run that has nothing left to train (every arm logged to its last epoch or diverged),
    read from its summary.json; None otherwise. Its checkpoints are not needed (a study keeps none)."""
    config = exp.config
    nothing_after_pretraining = config.pretrain_epochs == config.num_epochs
    if logged.get(PRETRAIN, 0) < config.pretrain_epochs or not all(
            logged.get(arm) == config.num_epochs or arm in diverged or nothing_after_pretraining
            for arm in exp.arms):
        return None
    try:
        return workdir_lib.read_summary(workdir)
    except workdir_lib.WorkdirError:
        return None


def _print_epoch(record):
    compiling = f" ({record['compile_seconds']:.1f}s compiling)" if record["compile_seconds"] >= 0.5 else ""
    extra = ""
    if "max_target" in record:  # the anchor shapes this arm's targets: how far from uniform (entropy ln C) it is
        uniform = np.log(len(record["anchor"]))
        extra = (f"  anchor entropy {record['anchor_entropy']:.3f} (uniform {uniform:.3f}), entries "
                 f"{record['anchor_min']:.3f}-{record['anchor_max']:.3f}")
    print(f"[{record['arm']:>8} seed {record['seed']}] epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
          f"test {record['test_accuracy']:6.2f}%  {record['epoch_seconds']:.1f}s{compiling}{extra}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, report=_print_epoch) -> dict:
    """Runs (or resumes) the experiment in ``workdir`` and returns its summary (also in summary.json), with
    ``already_finished`` True when the workdir held a finished run (its files then left untouched). One run
    per workdir at a time: WorkdirBusy while another holds it (``workdir.hold_lock``)."""
    with contextlib.ExitStack() as lock:  # the workdir's lock, once taken, is released however the run ends
        return _train_and_evaluate(config, workdir, report, lock)


def _take_workdir(config, workdir, lock: contextlib.ExitStack) -> None:
    """Locks the workdir (process 0; the others share it by design) and records the config; every process
    raises together when process 0 is refused, none left waiting at a barrier. Until the run has logged or
    saved an epoch, a stop puts a workdir that held no run back as it was (``_put_back_on_stop``)."""
    refused, found = None, _workdir_found(workdir)
    if distributed.is_primary():
        try:
            lock.enter_context(hold_lock(workdir))
            if _workdir_found(workdir) is None:  # another run trained here before the lock: not ours to remove
                found = None
            lock.push(_put_back_on_stop(workdir, found))  # pushed after the lock: unwound while it is held
            workdir_lib.check_config(workdir, config.to_dict())  # again, locked: another run may have trained here
        except (WorkdirBusy, WorkdirMismatch) as error:
            refused = error
    else:  # the same decision, so that every process raises the same stop
        lock.push(_put_back_on_stop(workdir, found))
    if distributed.any_process(refused is not None):
        raise refused or WorkdirBusy(f"workdir {workdir} was refused by process 0 (its error says why)")
    if distributed.is_primary():
        workdir_lib.record_config(workdir, config.to_dict())
    distributed.barrier("oat_jax:workdir-recorded")


def _train_and_evaluate(config, workdir, report, lock: contextlib.ExitStack) -> dict:
    # A stop asked of this run ends with it, not carried over to the next run in this process; one asked before
    # it began (a Ctrl-C in the command line's start-up) stops it before it writes anything.
    lock.callback(_STOP.clear)
    distributed.initialize(config)  # several processes: before anything runs on a device
    dispatch.WATCHDOG.configure(config.stall_timeout_seconds if sharding.data_mesh() is not None else 0,
                                _stall_hint(config))
    # Every check that can refuse the run comes before the first file is written.
    workdir_lib.check_config(workdir, config.to_dict())
    try:
        exp = Experiment.build(config)
        distributed.barrier("oat_jax:checked")
        stopped = _stop_agreed()  # a first Ctrl-C while the dataset loads takes effect here
    except KeyboardInterrupt:  # a second one, at once
        stopped = True
    if stopped:
        raise StoppedBeforeTraining("interrupted before training started; nothing was written")
    _take_workdir(config, workdir, lock)
    managers = {arm: ArmCheckpoints(workdir, arm) for arm in [PRETRAIN, *exp.arms]}
    log = MetricsLog(os.path.join(workdir, workdir_lib.METRICS_FILE), write=distributed.is_primary())
    try:
        ended = _ended_seeds(log.divergences())
        logged = _logged_epochs(log.records(), exp.seeds, ended)
        diverged = {arm for arm, seeds in ended.items() if set(exp.seeds) <= set(seeds)}  # every seed ended
        finished = _finished_summary(workdir, exp, logged, diverged)
        if finished is not None:  # nothing left to train: its files stay as they are
            return {**finished, "already_finished": True}
        points = _resume_points(managers, exp, logged, diverged)
        # Metrics of epochs past the checkpoints (an epoch logged but not saved, a damaged checkpoint) are redone.
        log.keep_only({arm: -1 if point is None else point.epoch for arm, point in points.items()})
        if distributed.is_primary():
            log.mirror = TensorBoardLog(workdir, log.records(), exp.seeds)
        point = points[PRETRAIN]
        if point is None:
            point = ResumePoint(0, 0, exp.template, None)
            managers[PRETRAIN].save(0, point.states)  # the branch point exists even with no pre-training
        states = point.states
        if point.epoch < config.pretrain_epochs:
            states = _run_arm(exp, states, PRETRAIN, objectives.PRETRAINING, point.epoch + 1, managers[PRETRAIN],
                              log, report, point)
        for arm in exp.arms:
            point = points[arm]
            if point is not None and point.states is None:
                continue  # this arm has finished
            if point is None:
                states = managers[PRETRAIN].restore(config.pretrain_epochs, exp.template)
                if arm != objectives.PRETRAINING and config.reset_momentum:
                    states = exp.fresh_optimiser(states)
                point = ResumePoint(config.pretrain_epochs, 0, states, None)
            _run_arm(exp, point.states, arm, arm, point.epoch + 1, managers[arm], log, report, point)
    finally:
        for manager in managers.values():
            manager.close()
        if log.mirror is not None:
            log.mirror.close()
    # On an imbalanced training set the stopping rule reads the balanced validation accuracy.
    summary = summarise(log.records(), exp.arms, config.paper.to_dict(), log.divergences(),
                        "val_balanced_accuracy" if config.train_imbalance > 1 else "val_accuracy")
    summary["dataset"] = {"name": exp.dataset.name, "source": exp.dataset.source,
                          "train_samples": len(exp.dataset.train_labels), "test_samples": len(exp.dataset.test_labels)}
    if exp.has_validation:
        summary["dataset"]["validation_samples"] = len(exp.dataset.validation_labels)
    summary["dataset"]["train_class_counts"] = np.bincount(exp.dataset.train_labels, minlength=exp.num_classes).tolist()
    if distributed.is_primary():
        write_json(os.path.join(workdir, workdir_lib.SUMMARY_FILE), summary)
    return summary
