"""OAT's test accuracy as a function of the test batch size, from a run's saved checkpoints.

OAT decodes a test batch with that batch's own anchor, so its accuracy depends on which samples share a
batch, and how many (the paper's Sec. 3.5 evaluates one sample at a time). ``evaluate_batch_sizes`` restores
the OAT arm's latest checkpoint and evaluates it at several batch sizes; the cross-entropy arm, whose
accuracy does not depend on the batch, is evaluated once as the reference. The results are kept in
``<workdir>/eval_batch_sizes.json`` and reused while the checkpoints they came from are the latest.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

from oat_jax.metrics_log import write_json

RESULTS_FILE = "eval_batch_sizes.json"
DEFAULT_SIZES = (1, 8, 32, 128, 0)  # 0 = the whole test set as one batch


class NoCheckpoint(RuntimeError):
    """The run has no checkpoint of the OAT arm to evaluate."""


def run_config(workdir: str):
    """The run's configuration: ``base_config()`` updated from its config.json (fields unknown to this
    version are ignored; the nested ``paper`` group is updated field by field)."""
    from oat_jax.config_schema import base_config
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    config = base_config()
    config.update({key: value for key, value in saved.items() if key in config})
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
    if not os.path.isdir(os.path.join(workdir, "checkpoints", arm)):
        return None
    with _checkpoints(workdir, arm) as checkpoints:
        return checkpoints.latest_epoch()


def _read_previous(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # none yet, or unreadable: evaluate afresh


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Evaluator:
    """The run's dataset, normalisation and model template, loaded once for several evaluations."""

    def __init__(self, workdir: str, config):
        from oat_jax import data, train
        self.workdir, self.config, self._train = workdir, config, train
        self.dataset = data.load_dataset(config.dataset, config.data_dir, config.train_limit, config.test_limit,
                                         image_size=config.image_size)
        self.mean, self.std = train.normalisation_statistics(config, self.dataset)
        model = train.cached_model(config.model, self.dataset.num_classes, config.dropout_rate)
        self.template = train.create_replicas(model, self.dataset.train_images.shape[1:], config)

    @property
    def test_samples(self) -> int:
        return len(self.dataset.test_labels)

    def restore(self, arm: str, epoch: int):
        with _checkpoints(self.workdir, arm) as checkpoints:
            return checkpoints.restore(epoch, self.template)

    def accuracies(self, states, decode: str, batch_size: int) -> list[float]:
        """Per-seed test accuracy (%) of the states, decoded by ``decode``, in test batches of ``batch_size``
        (0 = the whole test set)."""
        config = self.config.copy_and_resolve_references()
        config.eval_batch_size = batch_size or self.test_samples
        return self._train.evaluate(states, self.dataset, config, self.mean, self.std, decodes=(decode,))[decode]


def evaluate_batch_sizes(workdir: str, sizes=DEFAULT_SIZES) -> dict:
    """Test accuracy (%) of the OAT arm's latest checkpoint per test batch size (0 = the whole test set),
    per seed, and of the cross-entropy arm's (at the run's own eval_batch_size) for reference.

    Returns (and writes to ``<workdir>/eval_batch_sizes.json``) {"checkpoint_epochs": {"oat": e, "ce": e or
    None}, "seeds": [...], "test_samples": N, "oat": {"<size>": [accuracy per seed]}, "ce": [accuracy per
    seed] or None}. Sizes evaluated earlier from the same checkpoints are reused, not evaluated again.
    Raises NoCheckpoint when the run has no OAT checkpoint.
    """
    config = run_config(workdir)
    epochs = {arm: checkpoint_epoch(workdir, arm) for arm in ("oat", "ce")}
    if epochs["oat"] is None:
        raise NoCheckpoint(f"{workdir} has no checkpoint of the OAT arm to evaluate (the run's method is "
                           f"'{config.method}'; with 'both' or 'oat', OAT has not finished an epoch yet)")
    path = os.path.join(workdir, RESULTS_FILE)
    previous = _read_previous(path)
    if not previous or previous.get("checkpoint_epochs") != epochs:
        previous = None  # from older checkpoints: evaluated afresh
    oat, ce = (dict(previous["oat"]), previous["ce"]) if previous else ({}, None)
    wanted = [size for size in sizes if str(size) not in oat]
    if previous and not wanted and (ce is not None or epochs["ce"] is None):
        return previous
    from oat_jax import train
    evaluator = _Evaluator(workdir, config)
    if wanted:
        states = evaluator.restore("oat", epochs["oat"])
    for size in wanted:
        shown = size or f"{evaluator.test_samples} (the whole test set)"
        _progress(f"evaluating the OAT checkpoint of epoch {epochs['oat']} in test batches of {shown}")
        oat[str(size)] = evaluator.accuracies(states, "oat", size)
    if ce is None and epochs["ce"] is not None:
        _progress(f"evaluating the cross-entropy checkpoint of epoch {epochs['ce']}")
        ce = evaluator.accuracies(evaluator.restore("ce", epochs["ce"]), "ce", config.eval_batch_size)
    results = {"checkpoint_epochs": epochs, "seeds": train.replica_seeds(config),
               "test_samples": evaluator.test_samples, "oat": oat, "ce": ce}
    write_json(path, results)
    return results
