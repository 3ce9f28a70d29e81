"""The replicas evaluated on the test set by each decoding (``names.DECODES``) and on the validation split by
the arm's own, with the steps in flight bounded like the training's."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from oat_jax import dispatch, objectives, sharding
from oat_jax.experiment import ArmSteps, Experiment
from oat_jax.names import BATCH, UNIFORM


class Evaluation(NamedTuple):
    """Per decoding: each replica's accuracy (%), share of predictions per class and accuracy (%) on each true
    class (K, C; NaN for a class with no sample)."""
    accuracies: dict[str, list[float]]
    shares: dict[str, np.ndarray]
    recalls: dict[str, np.ndarray]


def _summed_counts(exp: Experiment, evaluate, batches, what: str) -> dict:
    """The counts ``evaluate`` returns over ``batches``, summed on the host (``what`` names a stalled set)."""
    in_flight, counts = dispatch.InFlight(exp.config.steps_in_flight), []
    for number, batch in enumerate(batches, 1):
        counts.append(evaluate(batch))
        in_flight.add(counts[-1], lambda number=number: f"evaluation ({what} batch {number})")
    in_flight.drain()
    counts = sharding.to_host(counts)
    return {key: np.sum([batch[key] for batch in counts], axis=0) for key in counts[0]}


def _placed_anchors(exp: Experiment, train_anchors=None):
    """The replicas' mean training anchors (K, C) on the devices; uniform where none are given."""
    if train_anchors is None:
        train_anchors = np.full((len(exp.seeds), exp.num_classes), 1.0 / exp.num_classes, np.float32)
    return sharding.place_states(np.asarray(train_anchors, np.float32), exp.mesh)


def _recalls(correct_per_class: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, 100.0 * correct_per_class / counts, np.nan)


def evaluate_in_detail(exp: Experiment, states, decodes: tuple[str, ...] = (UNIFORM, BATCH),
                       batch_size: int | None = None, train_anchors=None, steps: ArmSteps | None = None) -> Evaluation:
    """Each replica's test figures per decoding (TRAIN_ANCHOR with ``train_anchors`` (K, C)) in batches of
    ``batch_size`` (default ``eval_batch_size``), with the anchor variant of ``steps``' arm (default the config's)."""
    evaluate, anchors = (steps or exp.bind_steps()).evaluate, _placed_anchors(exp, train_anchors)
    totals = _summed_counts(exp, lambda batch: evaluate(states, batch, anchors, decodes=decodes),
                            exp.test_batches(batch_size or exp.config.eval_batch_size), "test")
    total, labels = len(exp.dataset.test_labels), exp.dataset.test_labels
    return Evaluation({name: [100.0 * int(c) / total for c in totals[name]] for name in decodes},
                      {name: totals[f"{name}_per_class"] / total for name in decodes},
                      {name: _recalls(totals[f"{name}_correct_per_class"], labels, exp.num_classes)
                       for name in decodes})


def evaluate(exp: Experiment, states, decodes: tuple[str, ...] = (UNIFORM, BATCH),
             batch_size: int | None = None) -> dict[str, list[float]]:
    """Test accuracy (%) of each replica per decoding: {decode: [accuracy of replica k]}."""
    return evaluate_in_detail(exp, states, decodes, batch_size).accuracies


def evaluate_validation(exp: Experiment, steps: ArmSteps, states) -> list[dict]:
    """Each replica's validation accuracy, balanced accuracy (mean recall, %) and mean loss (OAT's with each
    batch's anchor), by the arm's own decoding."""
    decode, anchors = objectives.get(steps.objective).decode, _placed_anchors(exp)
    totals = _summed_counts(exp, lambda batch: steps.evaluate(states, batch, anchors, decodes=(decode,),
                                                              with_loss=True),
                            exp.validation_batches(exp.config.eval_batch_size), "validation")
    labels = exp.dataset.validation_labels
    recalls = _recalls(totals[f"{decode}_correct_per_class"], labels, exp.num_classes)
    return [{"val_accuracy": 100.0 * int(correct) / len(labels), "val_balanced_accuracy": float(np.nanmean(recall)),
             "val_loss": float(loss) / len(labels)}
            for correct, recall, loss in zip(totals[decode], recalls, totals["loss_sum"])]
