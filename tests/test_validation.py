"""The validation split: stratified and seeded, kept out of training and its statistics, evaluated every
epoch; the epoch it selects in the summary, beside the oracle's."""
import json

import numpy as np
import pytest

from oat_jax import data, input_pipeline, workdir
from oat_jax.config_schema import ConfigError, validate_config
from oat_jax.data import holdout
from oat_jax.experiment import Experiment
from oat_jax.train import train_and_evaluate


def test_each_class_keeps_its_share_by_largest_remainders():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    # 3 of 10: exact shares 1.5, 0.9, 0.6 -> floors 1, 0, 0; the two largest remainders (0.9, 0.6) get one each
    assert holdout.per_class_counts(labels, 3, 3).tolist() == [1, 1, 1]
    assert holdout.per_class_counts(labels, 5, 3).tolist() == [3, 1, 1]  # 2.5, 1.5, 1.0: the tie goes to class 0
    assert holdout.validation_count(0.2, 10) == 2 and holdout.validation_count(7, 10) == 7


def test_the_split_is_stratified_disjoint_and_depends_on_its_seed_only():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    train, validation = holdout.stratified_split(labels, 0.1, seed=0, num_classes=4)
    assert np.bincount(labels[validation], minlength=4).tolist() == [4, 3, 2, 1]
    assert np.intersect1d(train, validation).size == 0
    assert sorted(np.concatenate([train, validation]).tolist()) == list(range(100))
    again = holdout.stratified_split(labels, 10, seed=0, num_classes=4)[1]
    other = holdout.stratified_split(labels, 10, seed=1, num_classes=4)[1]
    assert again.tolist() == validation.tolist() and other.tolist() != validation.tolist()


@pytest.mark.parametrize("size, problem", [(100, "leaving none to train on"), (0.001, "holds out no sample")])
def test_a_split_that_leaves_nothing_is_refused(size, problem):
    with pytest.raises(data.DatasetError, match=problem):
        holdout.stratified_split(np.repeat(np.arange(4), 25), size, seed=0, num_classes=4)
    with pytest.raises(data.DatasetError, match="every training sample of class 1"):
        holdout.stratified_split(np.array([0] * 18 + [1] * 2), 0.9, seed=0, num_classes=2)


@pytest.mark.parametrize("size", [-1.0, 2.5, float("nan"), float("inf")])
def test_impossible_validation_sizes_are_refused_by_the_config(synthetic_config, size):
    synthetic_config.validation_size = size
    with pytest.raises(ConfigError, match="validation_size"):
        validate_config(synthetic_config)


def test_held_out_images_stay_out_of_training_and_its_statistics(synthetic_config):
    full = Experiment.build(synthetic_config).dataset
    synthetic_config.validation_size = 40.0
    exp = Experiment.build(synthetic_config)
    assert len(exp.dataset.train_labels) == 160 and len(exp.dataset.validation_labels) == 40
    together = np.concatenate([exp.dataset.train_images, exp.dataset.validation_images])
    assert sorted(map(bytes, together)) == sorted(map(bytes, full.train_images))  # a partition of the training set
    mean, std = input_pipeline.channel_statistics(exp.dataset.train_images)
    np.testing.assert_array_equal(exp.mean, mean)  # the held-out images do not enter the normalisation
    # Evaluated shuffled (a class-sorted batch would give OAT's anchor the label), in a seeded fixed order.
    first = [labels for _, labels, _ in exp.validation_batches(16)]
    assert [batch.tolist() for batch in first] == [batch.tolist() for _, batch, _ in exp.validation_batches(16)]
    order = np.concatenate([batch[0] for batch in first])[:40]
    assert order.tolist() != sorted(order.tolist())
    assert sorted(order.tolist()) == sorted(exp.dataset.validation_labels.tolist())


def test_every_epoch_logs_validation_and_the_summary_selects_on_it(synthetic_config, tmp_path):
    synthetic_config.validation_size = 0.2
    synthetic_config.arms = "ce,oat"
    summary = train_and_evaluate(synthetic_config, str(tmp_path), report=lambda record: None)
    records = workdir.read_records(str(tmp_path / "metrics.jsonl"))
    assert len(records) == 2 + 2 * 2
    for record in records:
        assert 0 <= record["val_accuracy"] <= 100 and np.isfinite(record["val_loss"]) and record["val_loss"] > 0
        assert record["val_accuracy"] * 40 / 100 == pytest.approx(round(record["val_accuracy"] * 40 / 100))
    assert summary["dataset"]["train_samples"] == 160 and summary["dataset"]["validation_samples"] == 40
    for arm, phases in (("ce", ("pretrain", "ce")), ("oat", ("oat",))):
        history = [r for r in records if r["arm"] in phases]
        best = max(r["val_accuracy"] for r in history)
        selected = min(r["epoch"] for r in history if r["val_accuracy"] == best)  # a tie goes to the earlier
        seed = summary["arms"][arm]["seeds"]["0"]
        assert seed["selected_epoch"] == selected
        assert seed["test_accuracy_at_selected_epoch"] == next(r for r in history
                                                              if r["epoch"] == selected)["test_accuracy"]
        assert seed["oracle_best_test_accuracy"] == max(r["test_accuracy"] for r in history)
        assert "best_test_accuracy" not in seed
    assert summary["arms"]["oat"]["vs_ce"]["select"] == "validation"
    assert json.loads((tmp_path / "summary.json").read_text())["arms"]["oat"]["vs_ce"]["select"] == "validation"


def _record(arm, epoch, test, val=None):
    record = {"arm": arm, "epoch": epoch, "seed": 0, "test_accuracy": test}
    return record if val is None else {**record, "val_accuracy": val}


def test_the_selected_epoch_by_hand_and_the_comparison_under_its_rule():
    records = [_record("pretrain", 1, 50.0, 40.0), _record("ce", 2, 60.0, 55.0), _record("ce", 3, 58.0, 55.0),
               _record("oat", 2, 70.0, 50.0), _record("oat", 3, 64.0, 52.0)]
    arms = workdir.summarise(records, ["ce", "oat"], {})["arms"]
    assert arms["ce"]["seeds"]["0"]["selected_epoch"] == 2  # 55 twice: the earlier epoch
    assert arms["oat"]["seeds"]["0"]["selected_epoch"] == 3 and arms["oat"]["oracle_best_epoch"] == 2
    assert arms["oat"]["vs_ce"]["mean_difference"] == pytest.approx(64.0 - 60.0)  # not the final 64 - 58
    assert arms["oat"]["vs_ce"]["select"] == "validation"
    without = workdir.summarise([{k: v for k, v in r.items() if k != "val_accuracy"} for r in records],
                                ["ce", "oat"], {})["arms"]
    assert without["oat"]["vs_ce"]["select"] == "final"
    assert without["oat"]["vs_ce"]["mean_difference"] == pytest.approx(64.0 - 58.0)
    assert "selected_epoch" not in without["oat"]["seeds"]["0"]


def test_summaries_from_before_the_validation_split_still_read():
    old = {"final_test_accuracy": 60.0, "best_test_accuracy": 62.0, "best_test_accuracy_std": 0.5, "best_epoch": 7}
    assert workdir.oracle_named(old) == {"final_test_accuracy": 60.0, "oracle_best_test_accuracy": 62.0,
                                         "oracle_best_test_accuracy_std": 0.5, "oracle_best_epoch": 7}
