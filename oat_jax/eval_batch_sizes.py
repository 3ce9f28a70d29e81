"""OAT's test accuracy as a function of the test batch size, from a run's saved checkpoints.

OAT decodes a test batch with that batch's own anchor, so its accuracy depends on which samples share a
batch, and how many (the paper's Sec. 3.5 evaluates one sample at a time). ``evaluate_batch_sizes`` restores
the OAT arm's latest checkpoint and evaluates it at several batch sizes; the cross-entropy arm, whose
accuracy does not depend on the batch, is evaluated once as the reference. The results are kept in
``<workdir>/eval_batch_sizes.json`` and reused while the checkpoints they came from are the latest.
"""
from __future__ import annotations

import contextlib
import os
import sys

from oat_jax.names import BATCH, CE, OAT, UNIFORM
from oat_jax.workdir import CHECKPOINTS_DIR, WorkdirError, read_config, read_json, write_json

RESULTS_FILE = "eval_batch_sizes.json"
DEFAULT_SIZES = (1, 8, 32, 128, 0)  # 0 = the whole test set as one batch


class NoCheckpoint(RuntimeError):
    """The run has no checkpoint of the OAT arm to evaluate."""


def run_config(workdir: str):
    """The run's configuration: ``base_config()`` updated from its config.json (fields unknown to this version
    are ignored)."""
    from oat_jax.config_schema import base_config
    config = base_config()
    config.update({key: value for key, value in read_config(workdir).items() if key in config})
    config.progress = False
    return config


@contextlib.contextmanager
def _checkpoints(workdir: str, arm: str):
    from oat_jax.checkpoints import ArmCheckpoints  # Orbax: only imported when checkpoints are read
    checkpoints = ArmCheckpoints(workdir, arm)
    try:
        yield checkpoints
    finally:
        checkpoints.close()


def checkpoint_epoch(workdir: str, arm: str) -> int | None:
    """The arm's latest saved epoch, None without one (its folder is not created when missing)."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR, arm)):
        return None
    with _checkpoints(workdir, arm) as checkpoints:
        return checkpoints.latest_epoch()


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Evaluator:
    """The run's experiment (dataset, normalisation, model template), built once for several evaluations."""

    def __init__(self, workdir: str, config):
        from oat_jax import evaluation
        from oat_jax.experiment import Experiment
        self.workdir, self._evaluation = workdir, evaluation
        self.experiment = Experiment.build(config)

    @property
    def test_samples(self) -> int:
        return len(self.experiment.dataset.test_labels)

    def restore(self, arm: str, epoch: int):
        with _checkpoints(self.workdir, arm) as checkpoints:
            return checkpoints.restore(epoch, self.experiment.template)

    def accuracies(self, states, decode: str, batch_size: int) -> list[float]:
        """Per-seed test accuracy (%) of the states, decoded by ``decode`` (of ``names.DECODES``), in test
        batches of ``batch_size`` (0 = the whole test set)."""
        return self._evaluation.evaluate(self.experiment, states, (decode,), batch_size or self.test_samples)[decode]


def evaluate_batch_sizes(workdir: str, sizes=DEFAULT_SIZES) -> dict:
    """Test accuracy (%) of the OAT arm's latest checkpoint per test batch size (0 = the whole test set),
    per seed, and of the cross-entropy arm's (at the run's own eval_batch_size) for reference.

    Returns (and writes to ``<workdir>/eval_batch_sizes.json``) {"checkpoint_epochs": {"oat": e, "ce": e or
    None}, "seeds": [...], "test_samples": N, "oat": {"<size>": [accuracy per seed]}, "ce": [accuracy per
    seed] or None}. Sizes evaluated earlier from the same checkpoints are reused, not evaluated again.
    Raises NoCheckpoint when the run has no OAT checkpoint.
    """
    config = run_config(workdir)
    epochs = {arm: checkpoint_epoch(workdir, arm) for arm in (OAT, CE)}
    if epochs[OAT] is None:
        raise NoCheckpoint(f"{workdir} has no checkpoint of the OAT arm to evaluate (the run's arms are "
                           f"'{config.arms}'; with an 'oat' arm, OAT has not finished an epoch yet)")
    try:
        previous = read_json(workdir, RESULTS_FILE, "none yet")
    except WorkdirError:
        previous = None  # none yet, or unreadable: evaluated afresh
    if previous and previous.get("checkpoint_epochs") != epochs:
        previous = None  # from older checkpoints: evaluated afresh
    oat, ce = (dict(previous[OAT]), previous[CE]) if previous else ({}, None)
    wanted = [size for size in sizes if str(size) not in oat]
    if previous and not wanted and (ce is not None or epochs[CE] is None):
        return previous
    evaluator = _Evaluator(workdir, config)
    if wanted:
        states = evaluator.restore(OAT, epochs[OAT])
    for size in wanted:
        shown = size or f"{evaluator.test_samples} (the whole test set)"
        _progress(f"evaluating the OAT checkpoint of epoch {epochs[OAT]} in test batches of {shown}")
        oat[str(size)] = evaluator.accuracies(states, BATCH, size)
    if ce is None and epochs[CE] is not None:
        _progress(f"evaluating the cross-entropy checkpoint of epoch {epochs[CE]}")
        ce = evaluator.accuracies(evaluator.restore(CE, epochs[CE]), UNIFORM, config.eval_batch_size)
    results = {"checkpoint_epochs": epochs, "seeds": evaluator.experiment.seeds,
               "test_samples": evaluator.test_samples, OAT: oat, CE: ce}
    write_json(os.path.join(workdir, RESULTS_FILE), results)
    return results
