"""Class imbalance: the long-tailed profile, its per-class metrics, and the two prior-corrected objectives
against hand-computed values."""
import json
import math
import types
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from oat_jax import objectives, plots, report, train, workdir
from oat_jax.data import longtail
from oat_jax.experiment import Experiment
from oat_jax.objectives import LossSettings
from oat_jax.train import train_and_evaluate


def test_the_exponential_profile_by_hand():
    # n_max * 8^(-i/3): 100, 50, 25, 12.5 -> 12 (rounded down); a class never keeps more than it has.
    assert longtail.long_tail_counts(np.array([100, 100, 100, 100]), 8.0).tolist() == [100, 50, 25, 12]
    assert longtail.long_tail_counts(np.array([100, 100, 10, 100]), 8.0).tolist() == [100, 50, 10, 12]
    assert longtail.long_tail_counts(np.array([100, 100]), 1000.0).tolist() == [100, 1]  # at least one


def test_frequency_groups_and_prior():
    prior = longtail.class_prior(np.array([0] * 4 + [1] * 3 + [2] * 2 + [3]), 4)
    np.testing.assert_allclose(prior, [0.4, 0.3, 0.2, 0.1])
    groups = longtail.frequency_groups(np.array([0.1, 0.3, 0.2, 0.4]))
    assert {name: group.tolist() for name, group in groups.items()} == {"many": [3, 1], "medium": [2], "few": [0]}


def test_the_validation_split_is_drawn_first_and_stays_balanced(synthetic_config):
    full = Experiment.build(synthetic_config).dataset
    synthetic_config.validation_size, synthetic_config.train_imbalance = 40.0, 8.0
    exp = Experiment.build(synthetic_config)
    available = np.bincount(full.train_labels, minlength=4)
    held_out = np.bincount(exp.dataset.validation_labels, minlength=4)
    assert held_out.tolist() == np.round(40 * available / available.sum()).astype(int).tolist()  # stratified
    kept = np.bincount(exp.dataset.train_labels, minlength=4)
    assert kept.tolist() == longtail.long_tail_counts(available - held_out, 8.0).tolist()
    np.testing.assert_allclose(exp.prior, kept / kept.sum())
    # Each kept image is a training image, none of them held out; the test set is untouched.
    train_bytes = set(map(bytes, full.train_images))
    assert set(map(bytes, exp.dataset.train_images)) <= train_bytes
    assert not set(map(bytes, exp.dataset.train_images)) & set(map(bytes, exp.dataset.validation_images))
    assert len(exp.dataset.test_labels) == len(full.test_labels)
    synthetic_config.imbalance_seed = 1  # the same counts, other images
    other = Experiment.build(synthetic_config).dataset
    assert np.bincount(other.train_labels, minlength=4).tolist() == kept.tolist()
    assert sorted(map(bytes, other.train_images)) != sorted(map(bytes, exp.dataset.train_images))


def _loss(name, outputs, labels, prior, tau=1.0):
    settings = LossSettings(prior=tuple(prior), logit_adjustment_tau=tau)
    return objectives.get(name).loss(jnp.asarray(outputs, jnp.float32), jnp.asarray(labels),
                                     jnp.ones(len(labels), bool), settings)


def test_logit_adjusted_cross_entropy_by_hand():
    # z = 0 with prior (0.8, 0.2): the adjusted logits are log π, so the loss of label 1 is -log 0.2.
    loss = _loss("ce_logit_adjusted", [[0.0, 0.0]], [1], [0.8, 0.2])
    assert float(loss[0]) == pytest.approx(-math.log(0.2), rel=1e-6)
    # tau = 0 is plain cross-entropy: log 2 at z = 0.
    assert float(_loss("ce_logit_adjusted", [[0.0, 0.0]], [1], [0.8, 0.2], tau=0.0)[0]) == pytest.approx(math.log(2))
    # tau = 2 on z = (1, 0), label 0: logits 1 + 2 log 0.8, 2 log 0.2.
    a, b = 1 + 2 * math.log(0.8), 2 * math.log(0.2)
    expected = -(a - math.log(math.exp(a) + math.exp(b)))
    assert float(_loss("ce_logit_adjusted", [[1.0, 0.0]], [0], [0.8, 0.2], tau=2.0)[0]) == pytest.approx(expected,
                                                                                                       rel=1e-6)
    assert objectives.get("ce_logit_adjusted").decode == "uniform"


def test_oat_with_the_prior_anchor_by_hand():
    # A uniform prior: softmax(π) is uniform, so oat_prior is oat_uniform: targets (1, -1) for label 0.
    assert float(_loss("oat_prior", [[0.0, 0.0]], [0], [0.5, 0.5])[0]) == pytest.approx(1.0)
    # π = (1, 0): the anchor softmax(π) = (e, 1) / (e + 1); label 1's target is (e + 1) - 1 = e, the other -1.
    assert float(_loss("oat_prior", [[0.0, 0.0]], [1], [1.0, 0.0])[0]) == pytest.approx((1 + math.e ** 2) / 2,
                                                                                      rel=1e-6)
    assert objectives.get("oat_prior").decode == "uniform" and not objectives.get("oat_prior").uses_anchor


def test_a_third_without_test_images_is_none_not_nan():
    # Four classes by frequency: many = 0 and 1, medium = 2, few = 3; the test set holds no image of 2 or 3.
    exp = types.SimpleNamespace(prior=np.array([0.4, 0.3, 0.2, 0.1]), num_classes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice"
        figures = train._class_figures(exp, np.array([80.0, 90.0, np.nan, np.nan]), [0.25] * 4)
    assert figures["test_accuracy_per_class"] == [80.0, 90.0, None, None]
    assert figures["anchor_prior_correlation"] is None  # a constant anchor correlates with nothing
    assert figures["test_balanced_accuracy"] == 85.0 and figures["test_accuracy_many"] == 85.0
    assert figures["test_accuracy_medium"] is None and figures["test_accuracy_few"] is None
    json.dumps(figures, allow_nan=False)  # metrics.jsonl stays strict JSON
    # and a figure drawn from such records leaves a gap where the value is None
    epochs, values = plots._by_epoch([{"epoch": 1, "x": None}, {"epoch": 1, "x": 2.0}, {"epoch": 2, "x": 3.0}], "x")
    assert epochs.tolist() == [1, 2] and np.isnan(values[0][0]) and values[0][1] == 2.0 and values[1].tolist() == [3.0]


def test_an_imbalanced_run_logs_class_metrics_and_selects_on_balanced_validation(synthetic_config, tmp_path, capsys):
    synthetic_config.validation_size, synthetic_config.train_imbalance = 40.0, 4.0
    synthetic_config.arms = "ce,ce_logit_adjusted,oat_prior,oat"
    summary = train_and_evaluate(synthetic_config, str(tmp_path), report=lambda record: None)
    counts = summary["dataset"]["train_class_counts"]
    assert counts[0] == max(counts) and counts[3] == min(counts) and sum(counts) == summary["dataset"]["train_samples"]
    records = workdir.read_records(str(tmp_path / "metrics.jsonl"))
    assert {r["arm"] for r in records} == {"pretrain", "ce", "ce_logit_adjusted", "oat_prior", "oat"}
    test_counts = np.bincount(Experiment.build(synthetic_config).dataset.test_labels, minlength=4)
    for record in records:
        per_class = np.array(record["test_accuracy_per_class"])
        # Per-class accuracies recombine into the plain accuracy, weighted by the test set's class counts.
        assert (per_class * test_counts).sum() / test_counts.sum() == pytest.approx(record["test_accuracy"])
        assert record["test_balanced_accuracy"] == pytest.approx(per_class.mean())
        assert record["test_accuracy_many"] == pytest.approx(per_class[[0, 1]].mean())  # 4 classes: 2, 1, 1
        assert record["test_accuracy_few"] == pytest.approx(per_class[3])
        assert 0 <= record["val_balanced_accuracy"] <= 100
        assert record["train_prior"] == pytest.approx((np.array(counts) / sum(counts)).tolist())
        assert -1 <= record["anchor_prior_correlation"] <= 1
    for arm in ("ce_logit_adjusted", "oat_prior"):
        seed = summary["arms"][arm]["seeds"]["0"]
        history = [r for r in records if r["arm"] == arm]
        best = max(r["val_balanced_accuracy"] for r in history)
        assert seed["selected_on"] == "val_balanced_accuracy"
        assert seed["selected_epoch"] == min(r["epoch"] for r in history if r["val_balanced_accuracy"] == best)
        chosen = next(r for r in history if r["epoch"] == seed["selected_epoch"])
        assert seed["balanced_test_accuracy_at_selected_epoch"] == chosen["test_balanced_accuracy"]
        assert seed["few_test_accuracy_at_selected_epoch"] == chosen["test_accuracy_few"]
    assert json.loads((tmp_path / "summary.json").read_text())["dataset"]["train_class_counts"] == counts
    # The report scores by the few-shot third at the selected epoch, and pairs OAT with logit adjustment.
    capsys.readouterr()
    assert report.main([str(tmp_path), "--metric", "few"]) == 0
    out = capsys.readouterr().out
    few = summary["arms"]["oat"]["seeds"]["0"]["few_test_accuracy_at_selected_epoch"]
    assert f"| {few:.3f} | 1 |" in out and "least frequent third" in out
    assert "| ce_logit_adjusted |" in out[out.index("OAT against its controls"):]
