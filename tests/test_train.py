"""Training loop: masked steps, evaluation of every test sample, two-phase branching and resuming."""
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oat_jax import config_schema, data, evaluation, input_pipeline, models, oat, steps, train, workdir
from oat_jax import state as state_lib
from oat_jax.checkpoints import ArmCheckpoints
from oat_jax.experiment import Experiment
from oat_jax.workdir import WorkdirMismatch
from conftest import STANDIN_MODEL, scalars_of


TIMINGS = ("epoch_seconds", "compile_seconds")  # the fields two runs of one config may differ in


def _state_and_data(config):
    dataset = data.load_dataset(config.dataset)
    model = models.create_model(config.model, dataset.num_classes)
    state = state_lib.create_train_state(model, dataset.train_images.shape[1:], config, seed=0)
    mean, std = input_pipeline.channel_statistics(dataset.train_images)
    return state, dataset, mean, std


def _leaves_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.mark.parametrize("objective", ["ce", "oat"])
def test_padded_rows_do_not_change_a_step(synthetic_config, objective):
    state, dataset, mean, std = _state_and_data(synthetic_config)
    images, labels = dataset.train_images[:5], dataset.train_labels[:5]
    copy = lambda s: jax.tree.map(jnp.array, s)  # the step donates its input state
    real, loss_real, anchor_real = steps.train_step(copy(state), (images, labels, np.ones(5, bool)), mean, std,
                                                    objective=objective)
    padded_images = np.concatenate([images, dataset.train_images[100:103]])
    padded_labels = np.concatenate([labels, dataset.train_labels[100:103]])
    mask = np.array([True] * 5 + [False] * 3)
    padded, loss_padded, anchor_padded = steps.train_step(copy(state), (padded_images, padded_labels, mask), mean,
                                                          std, objective=objective)
    np.testing.assert_allclose(loss_real, loss_padded, rtol=1e-5)
    np.testing.assert_allclose(anchor_real, anchor_padded, rtol=1e-5)
    _leaves_close(real.params, padded.params, rtol=1e-4, atol=1e-7)


def test_oat_step_descends_the_oat_loss(synthetic_config):
    """The step's gradient is that of oat.oat_loss: one small step lowers the loss on the same batch."""
    state, dataset, mean, std = _state_and_data(synthetic_config)
    images, labels, mask = dataset.train_images[:16], dataset.train_labels[:16], np.ones(16, bool)
    params = jax.tree.map(jnp.array, state.params)
    new_state, loss_before, _ = steps.train_step(state, (images, labels, mask), mean, std, objective="oat")
    outputs = new_state.apply_fn({"params": new_state.params}, steps.normalise(images, mean, std))
    before = new_state.apply_fn({"params": params}, steps.normalise(images, mean, std))
    np.testing.assert_allclose(loss_before, oat.oat_loss(before, labels).mean(), rtol=1e-5)
    assert oat.oat_loss(outputs, labels).mean() < loss_before


@pytest.mark.parametrize("eval_batch_size", [1, 7, 32, 200])
def test_evaluation_counts_every_test_sample_once(synthetic_config, eval_batch_size):
    synthetic_config.eval_batch_size = eval_batch_size
    synthetic_config.shuffle_eval = False
    synthetic_config.num_seeds = 2
    exp = Experiment.build(synthetic_config)
    dataset, mean, std, states = exp.dataset, exp.mean, exp.std, exp.template
    accuracy = evaluation.evaluate(exp, states)
    labels = dataset.test_labels
    for k in range(2):
        params = jax.tree.map(lambda leaf: leaf[k], states.params)
        outputs = np.asarray(states.apply_fn({"params": params}, steps.normalise(dataset.test_images, mean, std)))
        expected_ce = 100.0 * np.mean(outputs.argmax(-1) == labels)
        correct = np.sum(_numpy_oat_predictions(outputs, eval_batch_size) == labels)
        assert accuracy["uniform"][k] == pytest.approx(expected_ce, abs=1e-9)
        assert accuracy["batch"][k] == pytest.approx(100.0 * correct / len(labels), abs=1e-9)


def _numpy_oat_predictions(outputs, batch_size):
    """OAT decoding of consecutive test batches, each with its own (released-variant) anchor: an
    independent NumPy computation."""
    predictions = []
    for start in range(0, len(outputs), batch_size):
        z = outputs[start:start + batch_size].astype(np.float64)
        soft = np.exp(z - z.max(1, keepdims=True))
        soft /= soft.sum(1, keepdims=True)
        centre = soft.mean(0)
        anchor = np.exp(centre) / np.exp(centre).sum()
        predictions.append(np.argmax(anchor * (z + 1), axis=1))
    return np.concatenate(predictions)


def test_telemetry_of_every_epoch(synthetic_config, tmp_path):
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs, synthetic_config.shuffle_eval = 3, 1, False
    _run(synthetic_config, tmp_path / "run")
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    for record in records:
        anchor = np.array(record["anchor"])
        assert anchor.shape == (4,) and anchor.sum() == pytest.approx(1.0)
        assert record["anchor_entropy"] == pytest.approx(-np.sum(anchor * np.log(anchor)), rel=1e-6)
        assert sum(record["prediction_share"]) == pytest.approx(1.0)
        assert [s["step"] for s in record["step_anchors"]] == [1, 4, 7, 10, 13]  # 13 batches of 16
        assert ("max_target" in record) == (record["arm"] == "oat")
    # The released anchor stays within [1/(e C), e/C], so the targets' magnitude stays below e C - 1.
    assert all(1.0 <= r["max_target"] < np.e * 4 - 1 for r in records if r["arm"] == "oat")
    # The last OAT epoch's prediction shares, recounted from its checkpoint with NumPy decoding.
    exp = Experiment.build(synthetic_config)
    dataset, mean, std = exp.dataset, exp.mean, exp.std
    manager = ArmCheckpoints(str(tmp_path / "run"), "oat")
    state = manager.restore(3, exp.template)
    manager.close()
    params = jax.tree.map(lambda leaf: leaf[0], state.params)
    outputs = np.asarray(state.apply_fn({"params": params}, steps.normalise(dataset.test_images, mean, std)))
    predicted = _numpy_oat_predictions(outputs, synthetic_config.eval_batch_size)
    np.testing.assert_allclose(records[-1]["prediction_share"], np.bincount(predicted, minlength=4) / 75, atol=1e-9)


def test_the_metrics_of_the_steps_add_up_on_the_device():
    """Three steps' metrics, accumulated inside the step, against hand-computed NumPy values: loss times rows,
    anchor sums, the largest OAT target (|onehot / a - 1| over real rows), the sampled anchors, and the first
    non-finite step with its loss."""
    rng = np.random.default_rng(0)
    anchors = rng.dirichlet(np.ones(5), size=3).astype(np.float32)  # (steps, classes)
    labels = rng.integers(0, 5, size=(3, 6)).astype(np.int32)
    masks = rng.random((3, 6)) < 0.7
    masks[:, 0] = True
    losses = np.array([0.5, np.nan, 2.0], np.float32)
    metrics = jax.tree.map(lambda leaf: leaf[0], steps.new_metrics(1, 5))
    for s in range(3):
        metrics = steps._accumulate(metrics, losses[s], anchors[s], (None, labels[s], masks[s]),
                                    np.array([0, 0, 1, 2, 2]), uses_anchor=True)
    rows = masks.sum(axis=1)
    assert int(metrics["rows"]) == rows.sum() and int(metrics["steps"]) == 3
    assert np.isnan(metrics["loss_sum"])  # the NaN step is counted, and reported:
    assert int(metrics["first_bad_step"]) == 1 and np.isnan(metrics["bad_loss"])
    np.testing.assert_allclose(metrics["anchor_sum"], (anchors * rows[:, None]).sum(axis=0), rtol=1e-6)
    expected = max(np.abs(oat.oat_targets(labels[s][masks[s]], anchors[s], 5)).max() for s in range(3))
    np.testing.assert_allclose(metrics["max_target"], expected, rtol=1e-5)
    np.testing.assert_array_equal(metrics["sampled_anchors"], anchors[[0, 0, 1, 2, 2]])


def _run(config, workdir, stop_after=None):
    """Runs train_and_evaluate; with stop_after=k, crashes after k logged epochs (a simulated kill)."""
    seen = []

    def report(record):
        seen.append(record)
        if stop_after is not None and len(seen) >= stop_after:
            raise KeyboardInterrupt
    return train.train_and_evaluate(config, str(workdir), report=report), seen


def test_both_arms_learn_and_branch_from_the_same_pretraining(synthetic_config, tmp_path):
    summary, records = _run(synthetic_config, tmp_path / "both")
    assert [(r["arm"], r["epoch"]) for r in records] == [
        ("pretrain", 1), ("pretrain", 2), ("ce", 3), ("ce", 4), ("oat", 3), ("oat", 4)]
    for arm in ("ce", "oat"):
        assert summary["arms"][arm]["final_test_accuracy"] > 60  # chance is 25 %
    assert all("anchor_entropy" in r for r in records if r["arm"] == "oat")
    assert json.load(open(tmp_path / "both" / "summary.json")) == json.loads(json.dumps(summary))
    # Each arm alone gives what it gives inside "both": the branches really share the pre-training.
    for arms in ("ce", "oat"):
        synthetic_config.arms = arms
        alone, _ = _run(synthetic_config, tmp_path / arms)
        summary["arms"][arms].pop("vs_ce", None)  # against the other arm, which the run alone lacks
        assert alone["arms"][arms] == summary["arms"][arms]


def test_momentum_is_reset_when_oat_starts_unless_configured(synthetic_config, tmp_path, monkeypatch):
    """The OAT arm starts from a zero momentum trace with reset_momentum, else from the pre-training's last."""
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs, synthetic_config.arms = 3, 2, "oat"
    run_arm, starting_traces = train._run_arm, {}

    def recording(run, arm, point):
        if arm == "oat":  # copied before the arm's steps donate (overwrite) the state
            starting_traces[run.exp.config.reset_momentum] = jax.device_get(
                optax.tree_utils.tree_get(point.states.opt_state, "trace"))
        return run_arm(run, arm, point)

    monkeypatch.setattr(train, "_run_arm", recording)
    template = Experiment.build(synthetic_config).template
    for reset in (True, False):
        synthetic_config.reset_momentum = reset
        _run(synthetic_config, tmp_path / str(reset))
        pre = ArmCheckpoints(str(tmp_path / str(reset)), "pretrain")
        pretrained = jax.device_get(optax.tree_utils.tree_get(pre.restore(2, template).opt_state, "trace"))
        pre.close()
        assert any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(pretrained))  # there is momentum to reset
        expected = jax.tree.map(np.zeros_like, pretrained) if reset else pretrained
        jax.tree.map(np.testing.assert_array_equal, starting_traces[reset], expected)


@pytest.mark.parametrize("model", ["lightweight", STANDIN_MODEL])
def test_interrupted_run_resumes_to_the_same_result(synthetic_config, tmp_path, model):
    """Also for a network with BatchNorm statistics and dropout (whose keys depend on the step only)."""
    synthetic_config.model = model
    synthetic_config.dropout_rate = 0.5 if model == STANDIN_MODEL else 0.0
    expected, _ = _run(synthetic_config, tmp_path / "straight")
    for stop_after in (1, 4):
        workdir = tmp_path / f"stopped{stop_after}"
        with pytest.raises(KeyboardInterrupt):
            _run(synthetic_config, workdir, stop_after=stop_after)
        resumed, records = _run(synthetic_config, workdir)
        assert resumed == expected
        assert len(records) == 6 - stop_after  # only the missing epochs were trained
        lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
        assert sorted((r["arm"], r["epoch"]) for r in lines) == sorted(
            [("pretrain", 1), ("pretrain", 2), ("ce", 3), ("ce", 4), ("oat", 3), ("oat", 4)])
    # A finished run is not retrained.
    again, records = _run(synthetic_config, tmp_path / "straight")
    assert again.pop("already_finished") and again == expected and records == []


def test_a_stop_part_way_through_an_epoch_is_saved_and_finished_exactly(synthetic_config, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM in the middle of an epoch (of the pre-training, then of the CE arm): the part-way
    state is saved, and the reruns end with exactly the uninterrupted run's metrics and summary."""
    synthetic_config.model, synthetic_config.dropout_rate = STANDIN_MODEL, 0.5
    expected, _ = _run(synthetic_config, tmp_path / "straight")
    real_step, calls = steps.train_step_replicas, []

    def step_then_maybe_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) in (5, 20, 33):  # 13 steps an epoch: epoch 1 step 5, epoch 2 step 7, CE epoch 3 step 7
            train.request_stop()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(steps, "train_step_replicas", step_then_maybe_stop)
    workdir = tmp_path / "stopped"
    for arm, point in (("pretrain", (1, 5)), ("pretrain", (2, 7)), ("ce", (3, 7))):
        with pytest.raises(KeyboardInterrupt):
            _run(synthetic_config, workdir)
        assert _points(workdir, arm)[-1] == point  # (epoch, steps done of it), at optimiser step 13 (e - 1) + s
    resumed, _ = _run(synthetic_config, workdir)
    assert resumed == expected
    assert len(calls) == 13 * 6  # no step was trained twice
    assert _points(workdir, "ce")[-1] == (4, None)

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                for line in open(tmp_path / run / "metrics.jsonl")]
    assert lines("stopped") == lines("straight")


def _points(workdir, arm):
    """The (epoch, steps done or None at an epoch's end) of an arm's checkpoints, by optimiser step."""
    manager = ArmCheckpoints(str(workdir), arm)
    try:
        return [manager._point(step) for step in sorted(manager._manager.all_steps())]
    finally:
        manager.close()


def _damage(folder):
    """Overwrites every file of a checkpoint with bytes no reader accepts."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00not a checkpoint" * 3)


@pytest.mark.parametrize("stop_after, damaged", [(4, 4), (3, 3)])  # back to CE epoch 3; to the branch point
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_used(synthetic_config, tmp_path, capsys,
                                                                     stop_after, damaged):
    """The CE arm's latest checkpoint is damaged after a stop: the rerun names it, moves it to
    checkpoints/corrupt/ (nothing deleted), resumes from the one before (or the arm's branch point) and
    ends with the uninterrupted run's summary."""
    synthetic_config.num_epochs = 5  # the CE arm is unfinished after the stop (a finished arm is never restored)
    expected, _ = _run(synthetic_config, tmp_path / "straight")
    workdir = tmp_path / "damaged"
    with pytest.raises(KeyboardInterrupt):
        _run(synthetic_config, workdir, stop_after=stop_after)
    step = 13 * damaged  # checkpoints are named by optimiser step, 13 an epoch
    _damage(workdir / "checkpoints" / "ce" / str(step))
    capsys.readouterr()
    resumed, _ = _run(synthetic_config, workdir)
    warning = capsys.readouterr().err
    assert f"checkpoints/ce/{step} cannot be restored" in warning
    assert (workdir / "checkpoints" / "corrupt" / f"ce-step{step}").is_dir()
    assert resumed == expected


def test_checkpoints_restore_the_evaluated_state(synthetic_config, tmp_path):
    summary, _ = _run(synthetic_config, tmp_path)
    exp = Experiment.build(synthetic_config)
    for arm, decode in (("ce", "uniform"), ("oat", "batch")):
        manager = ArmCheckpoints(str(tmp_path), arm)
        assert manager.latest_epoch() == synthetic_config.num_epochs
        restored = manager.restore(manager.latest_epoch(), exp.template)
        manager.close()
        accuracy = evaluation.evaluate(exp, restored)[decode]
        assert accuracy == [summary["arms"][arm]["final_test_accuracy"]]


def test_a_workdir_with_another_config_is_refused(synthetic_config, tmp_path):
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 2, 1
    _run(synthetic_config, tmp_path)
    synthetic_config.learning_rate = 0.5
    with pytest.raises(WorkdirMismatch, match="learning_rate"):
        _run(synthetic_config, tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 100_000}, "batch_size 100000 is larger than the training set (200 samples)"),
    ({"model": "lightweight", "image_size": 7}, "model 'lightweight' cannot take 7x7x1 images: the lightweight "
                                                "CNN needs images of at least 16x16 pixels"),
])
def test_a_refused_run_writes_nothing(synthetic_config, tmp_path, changes, message):
    """Values the config checks cannot know (they depend on the data and the model) are refused before the
    workdir is made; a folder holding only another run's config.json holds no run and does not stand in the way
    (the error is the value's, not a workdir mismatch), and is left as it was."""
    synthetic_config.update(changes)
    with pytest.raises(config_schema.ConfigError, match=re.escape(message)):
        train.train_and_evaluate(synthetic_config, str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only/config.json").write_text('{"learning_rate": 0.5}')
    with pytest.raises(config_schema.ConfigError, match=re.escape(message)):
        train.train_and_evaluate(synthetic_config, str(tmp_path / "config_only"))
    assert os.listdir(tmp_path / "config_only") == ["config.json"]
    assert (tmp_path / "config_only/config.json").read_text() == '{"learning_rate": 0.5}'


def test_a_missing_dataset_leaves_no_workdir_and_no_temporary_folder(synthetic_config, tmp_path, monkeypatch):
    """CIFAR-10 found nowhere (no local copy; tfds has not prepared it, and without TensorFlow cannot): one
    error, no workdir, and nothing left in the temporary folder by tensorflow-datasets."""
    monkeypatch.setenv("OAT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    synthetic_config.dataset = "cifar10"
    with pytest.raises(data.DatasetError, match="CIFAR-10 not found"):
        train.train_and_evaluate(synthetic_config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    assert os.listdir(tmp_path / "tmp") == []


def test_a_workdir_that_holds_only_a_config_takes_a_new_one(synthetic_config, tmp_path):
    (tmp_path / "config.json").write_text('{"learning_rate": 0.5}')
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 2, 1
    _run(synthetic_config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == synthetic_config.learning_rate


def _without_times(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in path.read_text().splitlines()]


def test_a_log_line_cut_short_is_trained_again_so_the_summary_stays_right(synthetic_config, tmp_path, capsys):
    """A finished run whose last metrics.jsonl line was cut short (a crash or a full disk mid-append): its
    checkpoint is ahead of the log, so the rerun removes it and trains that epoch again, ending with the
    uninterrupted run's summary and log instead of calling epoch 2 final."""
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 3, 1
    summary, _ = _run(synthetic_config, tmp_path)
    log = tmp_path / "metrics.jsonl"
    expected = _without_times(log)
    lines = log.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["arm"] == "oat" and json.loads(lines[-1])["epoch"] == 3
    log.write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    again, seen = _run(synthetic_config, tmp_path)
    assert [(r["arm"], r["epoch"]) for r in seen] == [("oat", 3)]
    assert again == summary and _without_times(log) == expected
    assert "is ahead of metrics.jsonl (the line of oat epoch 3 is missing or cut short)" in capsys.readouterr().err
    # The TensorBoard events follow the log: every arm's epochs once, the redone one included.
    for arm in ("pretrain", "ce", "oat"):
        scalars = scalars_of(tmp_path / "tensorboard" / arm)
        assert scalars["test_accuracy"] == pytest.approx({r["epoch"]: r["test_accuracy"] for r in expected
                                                          if r["arm"] == arm}, rel=1e-6)


def test_a_diverged_arm_is_recorded_and_the_other_arms_go_on(synthetic_config, tmp_path, capsys):
    synthetic_config.variant = "paper"
    synthetic_config.learning_rate = 0.5  # the paper's anchor diverges; cross-entropy does not
    synthetic_config.pretrain_epochs = 0
    synthetic_config.num_epochs = 2
    synthetic_config.arms = "oat,ce"
    summary, seen = _run(synthetic_config, tmp_path)
    warning = capsys.readouterr().err
    assert re.search(r"training diverged: arm 'oat', epoch 1, step \d+ of 13 .*paper variant.* Arm 'oat' stops "
                     r"here, its last good checkpoint kept; the other arms go on", warning)
    assert [(r["arm"], r["epoch"]) for r in seen] == [("ce", 1), ("ce", 2)]  # it went on
    step = int(re.search(r"step (\d+) of", warning).group(1))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    event = next(line for line in lines if line["arm"] == "oat")
    assert event["event"] == "diverged" and (event["epoch"], event["step"], event["seed"]) == (1, step, 0)
    assert event["message"] in warning
    assert ArmCheckpoints(str(tmp_path), "oat").latest_epoch() is None  # nothing diverged was saved
    # The summary says where; with no good epoch of its own the arm has no accuracy, and its state is the
    # branch point's (epoch 0).
    assert summary["arms"]["oat"] == {"seeds": {}, "diverged": {"0": {"epoch": 1, "step": step}}, "final_epoch": 0}
    assert summary["arms"]["ce"]["final_epoch"] == 2 and "diverged" not in summary["arms"]["ce"]
    # A rerun reads the divergence as the arm's end: nothing is trained again, the files stay as they were.
    before = (tmp_path / "metrics.jsonl").read_text()
    again, seen = _run(synthetic_config, tmp_path)
    assert seen == [] and again.pop("already_finished") and again == summary
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_a_non_finite_anchor_stops_training_too(synthetic_config, tmp_path, monkeypatch, request):
    """A finite loss with a non-finite anchor (as in the pre-training, whose loss does not use it) is divergence."""
    accumulate = steps._accumulate

    def with_a_broken_third_anchor(metrics, loss, anchor, *args, **kwargs):
        anchor = jnp.where(metrics["steps"] == 2, anchor.at[0].set(jnp.nan), anchor)
        return accumulate(metrics, loss, anchor, *args, **kwargs)

    monkeypatch.setattr(steps, "_accumulate", with_a_broken_third_anchor)
    jax.clear_caches()  # the steps compile again with the broken anchor, and again after
    request.addfinalizer(jax.clear_caches)
    with pytest.raises(train.TrainingDiverged, match=r"arm 'pretrain', epoch 1, step 3 of 13 .*anchor"):
        _run(synthetic_config, tmp_path)
    assert ArmCheckpoints(str(tmp_path), "pretrain").latest_epoch() == 0  # the last good one stays


@pytest.mark.parametrize("objective", ["ce", "oat"])
def test_fused_epoch_gives_the_step_by_step_result(synthetic_config, objective):
    """The compiled whole-epoch loop and the per-step loop train the same models on the same batches, padding
    included: 13 batches of 16, the last one partial and masked, on a network with BatchNorm (whose statistics
    the padded rows enter) and dropout."""
    synthetic_config.model, synthetic_config.dropout_rate = STANDIN_MODEL, 0.5
    plain = Experiment.build(synthetic_config)
    synthetic_config.fused_epoch = True
    fused = Experiment.build(synthetic_config, plain.dataset)
    copy = lambda s: jax.tree.map(jnp.array, s)
    plain_states, plain_metrics = train.train_epoch(plain, plain.bind_steps(objective), copy(plain.template), 1,
                                                    objective)
    fused_states, fused_metrics = train.train_epoch(fused, fused.bind_steps(objective), copy(plain.template), 1,
                                                    objective)
    assert np.asarray(fused_states.step).tolist() == np.asarray(plain_states.step).tolist() == [13]
    assert plain_metrics.keys() == fused_metrics.keys()
    for name in plain_metrics:
        np.testing.assert_allclose(fused_metrics[name], plain_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    _leaves_close(fused_states.params, plain_states.params, rtol=1e-5, atol=1e-6)
    _leaves_close(fused_states.batch_stats, plain_states.batch_stats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vectorised", [False, True], ids=["replica-loop", "vmap"])
def test_replicas_train_like_separate_runs(synthetic_config, tmp_path, monkeypatch, request, vectorised):
    """num_seeds=2 in one program gives each seed what a separate run with that seed gives: parameters
    after both arms, and the per-seed summaries; with the replicas looped (XLA:CPU) or vmapped (GPUs)."""
    monkeypatch.setattr(steps, "_vectorise_replicas", lambda: vectorised)
    jax.clear_caches()  # compiled steps of the other mapping must not be reused, here or after
    request.addfinalizer(jax.clear_caches)
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 3, 1
    synthetic_config.num_seeds = 2
    together, _ = _run(synthetic_config, tmp_path / "together")
    stacked = ArmCheckpoints(str(tmp_path / "together"), "oat")
    both = stacked.restore(3, Experiment.build(synthetic_config).template)
    stacked.close()
    synthetic_config.num_seeds = 1
    for k, seed in enumerate((0, 1)):
        synthetic_config.seed = seed
        alone, _ = _run(synthetic_config, tmp_path / f"seed{seed}")
        for arm in ("ce", "oat"):
            assert together["arms"][arm]["seeds"][str(seed)] == alone["arms"][arm]["seeds"][str(seed)]
        single = ArmCheckpoints(str(tmp_path / f"seed{seed}"), "oat")
        params = single.restore(3, Experiment.build(synthetic_config).template).params
        single.close()
        _leaves_close(jax.tree.map(lambda leaf: leaf[k], both.params), jax.tree.map(lambda leaf: leaf[0], params),
                      rtol=1e-5, atol=1e-6)
    assert together["arms"]["oat"]["final_test_accuracy"] == pytest.approx(np.mean(
        [together["arms"]["oat"]["seeds"][s]["final_test_accuracy"] for s in ("0", "1")]))


def test_a_diverging_seed_ends_only_itself(synthetic_config, tmp_path, capsys):
    """num_seeds=2 where the paper's anchor diverges in seed 0 only (in the last epoch, 4, here): seed 1 trains
    on to num_epochs and gets what its own run gets; the summary pairs and shows only finished seeds; a rerun
    after a kill past the divergence finishes the same, and a finished one trains nothing."""
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 4, 1
    synthetic_config.learning_rate, synthetic_config.arms = 0.02, "ce,oat_paper"
    synthetic_config.num_seeds = 2
    with pytest.raises(KeyboardInterrupt):  # stopped after the divergence, before the end
        _run(synthetic_config, tmp_path / "together", stop_after=2 + 3 * 2 + 2 + 2 + 1)
    assert "Seed 0 of arm 'oat_paper' stops here; its other seeds and the other arms go on" in capsys.readouterr().err
    together, _ = _run(synthetic_config, tmp_path / "together")
    arm = together["arms"]["oat_paper"]
    assert arm["diverged"] == {"0": {"epoch": 4, "step": arm["diverged"]["0"]["step"], "last_good_epoch": 3}}
    assert list(arm["seeds"]) == ["1"] and arm["final_epoch"] == 4
    assert arm["vs_ce"]["seeds"] == 1  # paired where both arms finished: seed 1 only
    records = [r for r in workdir.read_records(str(tmp_path / "together" / "metrics.jsonl"))
               if r["arm"] == "oat_paper"]
    assert [(r["epoch"], r["seed"]) for r in records] == [(2, 0), (2, 1), (3, 0), (3, 1), (4, 1)]
    synthetic_config.num_seeds, synthetic_config.seed = 1, 1
    alone, _ = _run(synthetic_config, tmp_path / "alone")
    assert alone["arms"]["oat_paper"]["seeds"]["1"] == arm["seeds"]["1"]
    assert alone["arms"]["ce"]["seeds"]["1"] == together["arms"]["ce"]["seeds"]["1"]
    alone_records = [r for r in workdir.read_records(str(tmp_path / "alone" / "metrics.jsonl"))
                     if r["arm"] == "oat_paper"]
    assert [(r["test_accuracy"], r["train_loss"]) for r in alone_records] == [
        (r["test_accuracy"], r["train_loss"]) for r in records if r["seed"] == 1]
    synthetic_config.num_seeds, synthetic_config.seed = 2, 0
    again, seen = _run(synthetic_config, tmp_path / "together")
    assert seen == [] and again.pop("already_finished") and again == together


def test_a_run_of_the_ce_arm_alone_that_only_pretrains_is_recognised_as_finished(synthetic_config, tmp_path):
    """arms="ce" with pretrain_epochs == num_epochs logs only "pretrain" lines, no "ce" line: its rerun was not
    recognised as finished, and rewrote metrics.jsonl and summary.json (issue 24). Now it trains nothing and
    leaves both files as they were, byte for byte and not even rewritten."""
    synthetic_config.arms, synthetic_config.num_epochs, synthetic_config.pretrain_epochs = "ce", 2, 2
    first, records = _run(synthetic_config, tmp_path)
    assert [(r["arm"], r["epoch"]) for r in records] == [("pretrain", 1), ("pretrain", 2)]
    files = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}
    dates = {name: (tmp_path / name).stat().st_mtime_ns for name in files}
    again, seen = _run(synthetic_config, tmp_path)
    assert seen == []  # nothing trained
    assert again.pop("already_finished") is True and again == first
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in files} == dates
