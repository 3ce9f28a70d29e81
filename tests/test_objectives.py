"""The objectives of the arms against hand-computed values and independent NumPy references."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oat_jax import oat, objectives, steps, train
from oat_jax.names import DECODES
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


def test_six_arms_of_three_seeds_train_from_one_pretraining(synthetic_config, tmp_path, monkeypatch, request):
    """Every objective as an arm of one run of three seeds: each continues the same pre-training, is evaluated
    with its own decoding and with the four of ``test_accuracy_by_decode``, and is summarised per seed and
    against cross-entropy; the OAT-type ones log their largest target."""
    # The replicas vectorised, as on accelerators: on XLA:CPU's default (K unrolled copies) twelve programs of
    # three copies each take two minutes to compile; test_train checks that both ways train alike.
    monkeypatch.setattr(steps, "_vectorise_replicas", lambda: True)
    jax.clear_caches()  # compiled steps of the other mapping must not be reused, here or after
    request.addfinalizer(jax.clear_caches)
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs, synthetic_config.num_seeds = 2, 1, 3
    synthetic_config.arms = ",".join(objectives.names())
    summary = train.train_and_evaluate(synthetic_config, str(tmp_path), report=lambda record: None)
    assert list(summary["arms"]) == list(objectives.names())
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["arm"], r["epoch"], r["seed"]) for r in records] == [
        (arm, epoch, seed) for arm, epoch in [("pretrain", 1)] + [(a, 2) for a in objectives.names()]
        for seed in (0, 1, 2)]
    for record in records[3:]:
        assert record["objective"] == record["arm"]
        assert ("max_target" in record) == objectives.get(record["arm"]).uses_anchor
        by_decode = record["test_accuracy_by_decode"]
        assert sorted(by_decode) == ["batch", "single", "train_anchor", "uniform"]
        assert record["test_accuracy"] == by_decode[objectives.get(record["arm"]).decode]
        result = summary["arms"][record["arm"]]
        assert result["seeds"][str(record["seed"])]["final_test_accuracy"] == record["test_accuracy"]
    for arm in objectives.names()[1:]:
        differences = [[r["test_accuracy"] for r in records if r["arm"] == arm and r["seed"] == seed][0]
                       - [r["test_accuracy"] for r in records if r["arm"] == "ce" and r["seed"] == seed][0]
                       for seed in (0, 1, 2)]
        comparison = summary["arms"][arm]["vs_ce"]
        assert comparison["seeds"] == 3 and comparison["wins"] == sum(d > 0 for d in differences)
        assert comparison["mean_difference"] == pytest.approx(np.mean(differences))


def test_the_four_decodings_against_numpy():
    """``steps._correct`` on fixed outputs: argmax (the uniform anchor's), OAT's decoding a * (z + 1) with the
    batch's anchor, with each row's own anchor, and with a given (training) anchor; the released anchor
    softmax(mean softmax z)."""
    outputs = np.array([[0.9, 1.0, -1.0], [0.2, -0.4, 0.1], [-0.3, 0.5, 0.4], [5.0, 5.0, 5.0]], np.float32)
    labels = np.array([0, 2, 1, 0], np.int32)
    mask = np.array([True, True, True, False])
    train_anchor = np.array([0.5, 0.3, 0.2], np.float32)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    batch_anchor = softmax(softmax(outputs[:3].astype(np.float64)).mean(0))  # the real rows only
    single_anchors = softmax(softmax(outputs.astype(np.float64)))
    expected = {"uniform": outputs.argmax(1), "batch": (batch_anchor * (outputs + 1)).argmax(1),
                "single": (single_anchors * (outputs + 1)).argmax(1),
                "train_anchor": (train_anchor * (outputs + 1)).argmax(1)}
    # Row 0 by hand: [0.9, 1.0, -1.0] + 1 = [1.9, 2.0, 0.0]; with the training anchor [0.95, 0.6, 0]: class 0,
    # while argmax says 1.
    assert expected["train_anchor"][0] == 0 and expected["uniform"][0] == 1

    class Fixed:  # a state whose model returns its inputs: outputs = images with mean 0, std 1/255
        apply_fn = staticmethod(lambda variables, images, train: images)

        def variables(self):
            return {}

    batch = (jnp.asarray(outputs), jnp.asarray(labels), jnp.asarray(mask))
    counts = steps._correct(Fixed(), batch, jnp.asarray(train_anchor), steps.StepSettings(0.0, 1 / 255), DECODES,
                            with_loss=False)
    for name in DECODES:
        assert int(counts[name]) == int(np.sum((expected[name] == labels) & mask)), name
        np.testing.assert_array_equal(counts[f"{name}_per_class"], np.bincount(expected[name][mask], minlength=3))
