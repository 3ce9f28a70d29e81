"""The objectives of the arms against hand-computed values and independent NumPy references."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from oat_jax import oat, objectives, train
from oat_jax.objectives import LossSettings

OUTPUTS = np.array([[1.0, -0.5, 2.0], [0.0, 3.0, -1.0], [9.0, 9.0, 9.0]], np.float32)
LABELS = np.array([2, 0, 1], np.int32)
MASK = np.array([True, True, False])  # the third row is padding


def _loss(name, **settings):
    return np.asarray(objectives.get(name).loss(jnp.asarray(OUTPUTS), jnp.asarray(LABELS), jnp.asarray(MASK),
                                                LossSettings(**settings)))


def test_oat_uniform_regresses_c_times_onehot_minus_one():
    # Targets C·onehot - 1 with C = 3: row 0 [-1, -1, 2], row 1 [2, -1, -1]; squared errors averaged over 3.
    expected = [((1 + 1) ** 2 + (-0.5 + 1) ** 2 + (2 - 2) ** 2) / 3, ((0 - 2) ** 2 + (3 + 1) ** 2 + 0 ** 2) / 3, 0.0]
    np.testing.assert_allclose(_loss("oat_uniform"), expected, rtol=1e-6)


@pytest.mark.parametrize("k, m", [(1.0, 1.0), (2.0, 3.0)])
def test_square_is_hui_and_belkins_rescaled_square_loss(k, m):
    # (1/C)·[k·(z_y - M)² + Σ_{i≠y} z_i²]
    expected = [(k * (2 - m) ** 2 + 1 ** 2 + 0.5 ** 2) / 3, (k * (0 - m) ** 2 + 3 ** 2 + 1 ** 2) / 3, 0.0]
    np.testing.assert_allclose(_loss("square", square_k=k, square_m=m), expected, rtol=1e-6)


def test_smoothed_cross_entropy_against_numpy():
    alpha = 0.1
    z = OUTPUTS.astype(np.float64)
    log_probabilities = z - z.max(1, keepdims=True)
    log_probabilities -= np.log(np.exp(log_probabilities).sum(1, keepdims=True))
    targets = np.full((3, 3), alpha / 3) + (1 - alpha) * np.eye(3)[LABELS]
    expected = -(targets * log_probabilities).sum(1) * MASK
    np.testing.assert_allclose(_loss("ce_smooth", label_smoothing=alpha), expected, rtol=1e-5)
    # alpha = 0 is plain cross-entropy
    np.testing.assert_allclose(_loss("ce_smooth", label_smoothing=0.0), _loss("ce"), rtol=1e-6)


def test_oat_paper_is_the_paper_variant_whatever_the_config_says():
    paper = oat.oat_loss(OUTPUTS, LABELS, variant="paper", where=MASK)
    np.testing.assert_allclose(_loss("oat_paper", variant="released"), paper, rtol=1e-6)
    assert not np.allclose(_loss("oat"), paper)  # the released anchor is another one


@pytest.mark.parametrize("name", objectives.names())
def test_every_objective_gives_a_loss_per_real_row_and_zero_on_padding(name):
    values = _loss(name)
    assert values.shape == (3,) and np.all(np.isfinite(values)) and values[2] == 0.0 and np.all(values[:2] > 0)


def test_six_arms_train_from_one_pretraining(synthetic_config, tmp_path):
    """Every objective as an arm of one run: each continues the same pre-training, is evaluated with its own
    decoding, and is summarised; the OAT-type ones log their largest target."""
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 2, 1
    synthetic_config.arms = ",".join(objectives.names())
    summary = train.train_and_evaluate(synthetic_config, str(tmp_path), report=lambda record: None)
    assert list(summary["arms"]) == list(objectives.names())
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["arm"], r["epoch"]) for r in records] == [("pretrain", 1)] + [(a, 2) for a in objectives.names()]
    for record in records[1:]:
        assert record["objective"] == record["arm"]
        assert ("max_target" in record) == objectives.get(record["arm"]).uses_anchor
        assert summary["arms"][record["arm"]]["final_test_accuracy"] == record["test_accuracy"]
