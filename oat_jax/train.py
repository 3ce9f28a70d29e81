"""The training loop: a shared cross-entropy pre-training, then every arm of ``config.arms`` continued from it to
``num_epochs``, with Orbax checkpoints and a line of ``metrics.jsonl`` per arm, epoch and seed.

The arm "ce" continues the pre-training's optimiser state; every other arm starts from the saved pre-trained
state (with a fresh optimiser under ``reset_momentum``). A run resumes exactly where it stopped, part-way through
an epoch included. ``train_and_evaluate`` reads in the order a run goes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from oat_jax import dispatch, distributed, evaluation, oat, objectives, resume, sharding
from oat_jax import workdir as workdir_lib
from oat_jax.checkpoints import ArmCheckpoints, ResumePoint, quiet_checkpoint_noise
from oat_jax.data import longtail
from oat_jax.experiment import ArmSteps, Experiment
from oat_jax.names import DECODES, PRETRAIN
from oat_jax.steps import new_metrics, sampled_steps
from oat_jax.tensorboard import TensorBoardLog
from oat_jax.workdir import MetricsLog, WorkdirBusy, WorkdirMismatch


class TrainingDiverged(RuntimeError):
    """The shared pre-training diverged, so no arm can start from it (a diverged arm only ends itself)."""


class StoppedBeforeTraining(KeyboardInterrupt):
    """A stop before the run's first epoch was saved: the workdir is as the run found it."""


class EpochStopped(KeyboardInterrupt):
    """A stop part-way through an epoch: ``point`` is where a rerun resumes it."""

    def __init__(self, point: ResumePoint):
        super().__init__()
        self.point = point


_STOP_CHECK_STEPS = 10  # several processes agree on a stop this many steps apart (each agreement waits)
_STOP = threading.Event()


def request_stop() -> None:
    """Asks the run in this process (or the next one) to stop at its next step, progress checkpointed."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def _stop_agreed() -> bool:
    """Whether any process was asked to stop; the same answer on all of them."""
    return distributed.any_process(_STOP.is_set())


class CompileClock:
    """Seconds spent tracing and compiling (JAX's own events) while entered, logged beside each epoch's time."""
    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.seconds = 0.0

    def _count(self, event: str, seconds: float, **_) -> None:
        if event in self.EVENTS:
            self.seconds += seconds

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._count)
        return self

    def __exit__(self, *exception) -> None:
        jax.monitoring.unregister_event_duration_listener(self._count)


@dataclasses.dataclass
class _Run:
    """What the arms of a run share."""
    exp: Experiment
    log: MetricsLog
    checkpoints: dict[str, ArmCheckpoints]
    report: Callable[[dict], None]
    clock: CompileClock


def _print_epoch(record):
    compiling = f" ({record['compile_seconds']:.1f}s compiling)" if record["compile_seconds"] >= 0.5 else ""
    extra = ""
    if "max_target" in record:  # the anchor shapes this arm's targets: how far from uniform (entropy ln C) it is
        extra = (f"  anchor entropy {record['anchor_entropy']:.3f} (uniform {np.log(len(record['anchor'])):.3f}), "
                 f"entries {record['anchor_min']:.3f}-{record['anchor_max']:.3f}")
    print(f"[{record['arm']:>8} seed {record['seed']}] epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  "
          f"test {record['test_accuracy']:6.2f}%  {record['epoch_seconds']:.1f}s{compiling}{extra}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, report=_print_epoch) -> dict:
    """Runs (or resumes) the experiment in ``workdir`` and returns its summary (also summary.json), with
    ``already_finished`` True when the workdir held a finished run (left untouched). WorkdirBusy while another
    run holds the workdir. What the run installs or takes is given back however it ends."""
    with contextlib.ExitStack() as scope:
        scope.callback(_STOP.clear)  # a stop ends this run only; one asked before it began stops it unwritten
        distributed.initialize(config)  # several processes: before anything runs on a device
        clock = scope.enter_context(CompileClock())
        scope.enter_context(quiet_checkpoint_noise())
        scope.enter_context(dispatch.WATCHDOG.running(
            config.stall_timeout_seconds if sharding.data_mesh() is not None else 0, _stall_hint(config)))
        workdir_lib.check_config(workdir, config.to_dict())  # every refusal comes before the first file
        try:
            exp = Experiment.build(config)
            distributed.barrier("oat_jax:checked")
            stopped = _stop_agreed()  # a first Ctrl-C while the dataset loads takes effect here
        except KeyboardInterrupt:  # a second one, at once
            stopped = True
        if stopped:
            raise StoppedBeforeTraining("interrupted before training started; nothing was written")
        _take_workdir(config, workdir, scope)

        with contextlib.ExitStack() as files:  # closed (their saves complete on disk) before the summary
            checkpoints = {arm: files.enter_context(contextlib.closing(ArmCheckpoints(workdir, arm)))
                           for arm in [PRETRAIN, *exp.arms]}
            log = MetricsLog(os.path.join(workdir, workdir_lib.METRICS_FILE), write=distributed.is_primary())
            finished, points = resume.plan(workdir, exp, log, checkpoints)
            if finished is not None:  # nothing left to train: its files stay as they are
                return {**finished, "already_finished": True}
            # Metrics of epochs past the checkpoints (logged but not saved, a damaged checkpoint) are redone.
            log.keep_only({arm: -1 if point is None else point.epoch for arm, point in points.items()})
            if distributed.is_primary():
                log.mirror = files.enter_context(contextlib.closing(TensorBoardLog(workdir, log.records(), exp.seeds)))
            _train_arms(_Run(exp, log, checkpoints, report, clock), points)

        # On an imbalanced training set the stopping rule reads the balanced validation accuracy.
        summary = workdir_lib.summarise(log.records(), exp.arms, config.paper.to_dict(), log.divergences(),
                                        "val_balanced_accuracy" if config.train_imbalance > 1 else "val_accuracy")
        summary["dataset"] = _dataset_block(exp)
        if distributed.is_primary():
            workdir_lib.write_json(os.path.join(workdir, workdir_lib.SUMMARY_FILE), summary)
        return summary


def _dataset_block(exp: Experiment) -> dict:
    data = exp.dataset
    block = {"name": data.name, "source": data.source, "train_samples": len(data.train_labels),
             "test_samples": len(data.test_labels)}
    if exp.has_validation:
        block["validation_samples"] = len(data.validation_labels)
    block["train_class_counts"] = np.bincount(data.train_labels, minlength=exp.num_classes).tolist()
    return block


def _stall_hint(config) -> str:
    cpu = (f"XLA:CPU's cross-device reductions can deadlock with many steps in flight: lower "
           f"--config.steps_in_flight (now {config.steps_in_flight}), or ")
    return (cpu if jax.default_backend() == "cpu" else "") + (
        "raise --config.stall_timeout_seconds if one step of this model takes longer; ")


def _take_workdir(config, workdir: str, scope: contextlib.ExitStack) -> None:
    """Locks the workdir (process 0; the others share it) and records the config; every process raises
    together when process 0 is refused. Until the run has logged or saved an epoch, a stop puts a workdir that
    held no run back as it was found and raises StoppedBeforeTraining."""
    refused, found = None, workdir_lib.as_found(workdir)
    if distributed.is_primary():
        try:
            scope.enter_context(workdir_lib.hold_lock(workdir))
            if workdir_lib.as_found(workdir) is None:  # another run trained here before the lock: not ours to remove
                found = None
            workdir_lib.check_config(workdir, config.to_dict())  # again, locked: another run may have trained here
        except (WorkdirBusy, WorkdirMismatch) as error:
            refused = error

    def put_back_on_stop(kind, error, traceback) -> bool:  # unwound while the lock is held
        if (found is None or not isinstance(error, KeyboardInterrupt)
                or isinstance(error, (EpochStopped, StoppedBeforeTraining))
                or workdir_lib.read_lines(os.path.join(workdir, workdir_lib.METRICS_FILE))):
            return False
        if distributed.is_primary():
            workdir_lib.put_back(workdir, found)
        raise StoppedBeforeTraining(f"interrupted before the first epoch was saved; nothing was kept in {workdir}")

    if refused is None:
        scope.push(put_back_on_stop)
    if distributed.any_process(refused is not None):
        raise refused or WorkdirBusy(f"workdir {workdir} was refused by process 0 (its error says why)")
    if distributed.is_primary():
        workdir_lib.record_config(workdir, config.to_dict())
    distributed.barrier("oat_jax:workdir-recorded")


def _train_arms(run: _Run, points: dict) -> None:
    """The pre-training to its last epoch, then every arm from its point (a finished arm's holds no states)."""
    exp, pretraining, point = run.exp, run.checkpoints[PRETRAIN], points[PRETRAIN]
    if point is None:
        point = ResumePoint(0, 0, exp.template, None)
        pretraining.save(0, point.states)  # the branch point exists even with no pre-training
    if point.epoch < exp.config.pretrain_epochs:
        _run_arm(run, PRETRAIN, point)
    for arm in exp.arms:
        point = points[arm]
        if point is None:
            states = pretraining.restore(exp.config.pretrain_epochs, exp.template)
            if arm != objectives.PRETRAINING and exp.config.reset_momentum:
                states = exp.fresh_optimiser(states)
            point = ResumePoint(exp.config.pretrain_epochs, 0, states, None)
        if point.states is not None:
            _run_arm(run, arm, point)


def _run_arm(run: _Run, arm: str, point: ResumePoint) -> None:
    """Trains one arm's epochs after ``point``, logging (a line per seed) and checkpointing each, until every
    seed has diverged. A stop part-way through an epoch saves its progress first."""
    exp = run.exp
    steps = exp.bind_steps(objectives.of_arm(arm))  # bound once for all of the arm's epochs
    last = exp.config.pretrain_epochs if arm == PRETRAIN else exp.config.num_epochs
    # Replicas that diverged earlier compute on (on NaNs) but log nothing more.
    ended = {exp.seeds.index(event["seed"]) for event in run.log.divergences()
             if event["arm"] == arm and event["seed"] in exp.seeds}
    states, part_way = point.states, point if point.steps_done else None
    for epoch in range(point.epoch + 1, last + 1):
        if _stop_agreed():
            raise KeyboardInterrupt
        started, compiled = time.perf_counter(), run.clock.seconds
        try:
            states, metrics = train_epoch(exp, steps, states, epoch, arm, part_way)
        except EpochStopped as stop:
            run.checkpoints[arm].save(epoch, stop.point.states, stop.point.steps_done, stop.point.metrics)
            raise
        part_way = None
        diverged = [k for k in diverged_replicas(metrics) if k not in ended]
        if diverged and arm == PRETRAIN:  # nothing can branch from it
            raise TrainingDiverged(divergence(exp, metrics, arm, epoch, diverged[0])
                                   + ". The last good checkpoint is kept.")
        if diverged:  # those seeds end here; the arm's other seeds train on
            _record_divergence(run, arm, epoch, metrics, diverged)
            ended.update(diverged)
            if len(ended) == len(exp.seeds):
                return
        train_anchors = metrics["anchor_sum"] / metrics["rows"][:, None]
        tested = evaluation.evaluate_in_detail(exp, states, DECODES, train_anchors=train_anchors, steps=steps)
        validated = evaluation.evaluate_validation(exp, steps, states) if exp.has_validation else []
        records = _epoch_records(exp, arm, epoch, metrics, tested,
                                 (time.perf_counter() - started, run.clock.seconds - compiled))
        for record, figures in zip(records, validated):
            record.update(figures)
        records = [record for k, record in enumerate(records) if k not in ended]
        for record in records:  # the lines first: an epoch logged but not checkpointed is redone on resume
            run.log.append(record)
        run.checkpoints[arm].save(epoch, states)
        if distributed.is_primary():
            for record in records:
                run.report(record)


class _Progress(tqdm):
    monitor_interval = 0  # no monitor thread, which would outlive the run


def train_epoch(exp: Experiment, steps: ArmSteps, states, epoch: int, arm: str, resume: ResumePoint | None = None):
    """One pass over the training set for every replica: (states, metrics on the host). ``resume`` continues an
    epoch stopped part-way; a stop request raises EpochStopped. With the training set on the devices the epoch
    is one compiled loop, otherwise step by step with a progress bar: the same step on the same batches."""
    config, count, orders = exp.config, exp.steps_per_epoch(), exp.epoch_orders(epoch)
    done, metrics = (resume.steps_done, resume.metrics) if resume else (0, new_metrics(len(exp.seeds), exp.num_classes))
    states = resume.states if resume else states
    metrics = sharding.place_states(metrics, exp.mesh)
    if steps.train_on_device is not None:
        states, metrics = steps.train_on_device(states, metrics, orders, done)
        return states, sharding.to_host(metrics)
    progress = _Progress(total=count, initial=done, desc=f"{arm} epoch {epoch}/{config.num_epochs}", leave=False,
                         disable=None if config.progress and distributed.is_primary() else True, file=sys.stderr)
    check_every = 1 if jax.process_count() == 1 else _STOP_CHECK_STEPS
    in_flight = dispatch.InFlight(config.steps_in_flight)
    for number, batch in enumerate(exp.train_batches(orders, done), done + 1):
        states, metrics = steps.train(states, metrics, batch)
        in_flight.add(metrics["steps"], lambda number=number: f"training of arm '{arm}', epoch {epoch}, step "
                                                              f"{number} of {count}")
        progress.update()
        if number < count and (number - done) % check_every == 0 and _stop_agreed():
            progress.close()
            raise EpochStopped(ResumePoint(epoch - 1, number, states, metrics))
    progress.close()
    in_flight.drain()
    return states, sharding.to_host(metrics)


def diverged_replicas(metrics) -> list[int]:
    """The replicas whose epoch ``metrics`` show a non-finite loss or anchor."""
    return [int(k) for k in np.flatnonzero(metrics["first_bad_step"] >= 0)]


def divergence(exp: Experiment, metrics, arm: str, epoch: int, k: int) -> str:
    """Why replica ``k`` diverged: arm, epoch, step, seed and the likely cause."""
    objective = objectives.of_arm(arm)
    if objectives.get(objective).uses_anchor and objectives.anchor_variant(objective, exp.config.variant) == "paper":
        hint = ("the paper variant's anchor softmax(mean z) underflows when the outputs spread apart, and its "
                "targets 1/a - 1 explode; lower learning_rate or use variant='released'")
    else:
        hint = "the learning rate is likely too high for this model; lower learning_rate"
    return (f"training diverged: arm '{arm}', epoch {epoch}, step {metrics['first_bad_step'][k] + 1} of "
            f"{exp.steps_per_epoch()}" + (f", seed {exp.seeds[k]}" if len(exp.seeds) > 1 else "")
            + f" has a non-finite loss or anchor (loss {metrics['bad_loss'][k]}, anchor entries "
            f"{np.round(metrics['bad_anchor'][k, :4], 6).tolist()}...); {hint}")


def _record_divergence(run: _Run, arm: str, epoch: int, metrics, replicas) -> None:
    """Ends the diverged ``replicas`` of an arm with a line each in metrics.jsonl (``workdir.DIVERGED``), which a
    rerun reads as that seed's end; the arm's other seeds and the other arms go on."""
    exp = run.exp
    for k in replicas:
        message = divergence(exp, metrics, arm, epoch, k)
        run.log.append({"arm": arm, "epoch": epoch, "seed": exp.seeds[k], "objective": objectives.of_arm(arm),
                        "event": workdir_lib.DIVERGED, "step": int(metrics["first_bad_step"][k]) + 1,
                        "steps_per_epoch": exp.steps_per_epoch(), "loss": float(metrics["bad_loss"][k]),
                        "message": message})
        alone = len(exp.seeds) == 1 or len(replicas) == len(exp.seeds)
        distributed.warn(f"{message}. " + (f"Arm '{arm}' stops here, its last good checkpoint kept; the other arms "
                                           "go on." if alone else f"Seed {exp.seeds[k]} of arm '{arm}' stops here; "
                                                                  "its other seeds and the other arms go on."))


def _epoch_records(exp: Experiment, arm: str, epoch: int, metrics, tested: evaluation.Evaluation,
                   seconds: tuple[float, float]) -> list[dict]:
    """An epoch's lines of metrics.jsonl, one per seed: loss, test accuracy (by the arm's decoding and by each
    of ``DECODES``), time and compile time, the anchors' telemetry (the cross-entropy arms compute the batch
    anchor too, to compare) and the figures by class."""
    sampled, first = np.unique(sampled_steps(exp.steps_per_epoch()), return_index=True)
    objective = objectives.of_arm(arm)
    decode = objectives.get(objective).decode
    records = []
    for k, seed in enumerate(exp.seeds):
        rows = float(metrics["rows"][k])
        anchor = metrics["anchor_sum"][k] / rows
        record = {"arm": arm, "epoch": epoch, "seed": seed, "objective": objective,
                  "train_loss": float(metrics["loss_sum"][k] / rows), "test_accuracy": tested.accuracies[decode][k],
                  "test_accuracy_by_decode": {name: tested.accuracies[name][k] for name in DECODES},
                  "epoch_seconds": seconds[0], "compile_seconds": seconds[1], "anchor": [float(a) for a in anchor],
                  "prediction_share": [float(p) for p in tested.shares[decode][k]],
                  "step_anchors": [{"step": int(step) + 1,
                                    "anchor": [float(a) for a in metrics["sampled_anchors"][k, i]]}
                                   for step, i in zip(sampled, first)]}
        record.update({f"anchor_{key}": float(value) for key, value in oat.anchor_statistics(anchor).items()})
        if objectives.get(objective).uses_anchor:
            record["max_target"] = float(metrics["max_target"][k])
        record.update(_class_figures(exp, tested.recalls[decode][k], record["anchor"]))
        records.append(record)
    return records


def _class_figures(exp: Experiment, recalls: np.ndarray, anchor: list[float]) -> dict:
    """Test accuracy per class, their mean (balanced accuracy) and means over the thirds of the classes by
    training frequency; on an imbalanced training set the prior and its correlation with the mean anchor."""
    def mean(values):  # over the classes that the test set holds; None where it holds none (not NaN: JSON)
        return float(np.nanmean(values)) if np.isfinite(values).any() else None

    figures = {"test_accuracy_per_class": [None if np.isnan(r) else float(r) for r in recalls],
               "test_balanced_accuracy": mean(recalls)}
    for group, classes in longtail.frequency_groups(exp.prior).items():
        figures[f"test_accuracy_{group}"] = mean(recalls[classes])
    if np.ptp(exp.prior) > 1e-3 / exp.num_classes:  # a prior that is not (nearly) uniform
        figures["train_prior"] = [float(p) for p in exp.prior]
        figures["anchor_prior_correlation"] = float(np.corrcoef(anchor, exp.prior)[0, 1]) if np.ptp(anchor) else None
    return figures
