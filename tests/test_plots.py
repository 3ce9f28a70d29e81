"""python -m oat_jax.report plots: the figures of a real tiny run, the test-batch-size sweep against
independent evaluations, runs from before the anchor telemetry, several seeds, clear errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import SYNTHETIC
from oat_jax import eval_batch_sizes, evaluation, objectives, plots, report, train
from oat_jax.checkpoints import ArmCheckpoints
from oat_jax.experiment import Experiment
from oat_jax.names import PRETRAIN

FIGURES = ("accuracy.png", "anchor_heatmap.png", "anchor_entropy.png", "prediction_share.png",
           "anchor_range.png", "eval_batch_size.png")
# The fields a run logs since the anchor telemetry; older runs logged anchor statistics for OAT only.
TELEMETRY = ("anchor", "prediction_share", "step_anchors", "max_target")


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _fake_run(workdir, seeds=(0, 1), classes=4, pretrain_epochs=1, num_epochs=3, old=False, arms=("ce", "oat")):
    """A workdir as a run of arms "ce,oat" leaves it (no checkpoints), its metrics made up; ``old``: as
    runs logged them before the anchor telemetry (anchor statistics for OAT only)."""
    rng = np.random.default_rng(0)
    workdir.mkdir()
    config = {"dataset": SYNTHETIC, "model": "lightweight", "num_epochs": num_epochs, "arms": "ce,oat",
              "pretrain_epochs": pretrain_epochs, "eval_batch_size": 16,
              "paper": {"table": "", "setting": "", "ce": 0.0, "oat": 0.0}}
    (workdir / "config.json").write_text(json.dumps(config))
    phases = [("pretrain", range(1, pretrain_epochs + 1))] + [(arm, range(pretrain_epochs + 1, num_epochs + 1))
                                                             for arm in arms]
    with open(workdir / "metrics.jsonl", "w") as f:
        for arm, epochs in phases:
            for epoch, seed in ((epoch, seed) for epoch in epochs for seed in seeds):
                anchor = rng.dirichlet(np.full(classes, 100.0))
                record = {"arm": arm, "epoch": epoch, "seed": seed, "objective": "ce" if arm == "pretrain" else arm,
                          "train_loss": 1.0 / epoch, "test_accuracy": 50.0 + 10 * epoch - 5 * seed,
                          "epoch_seconds": 1.0, "anchor": anchor.tolist(),
                          "anchor_entropy": float(-(anchor * np.log(anchor)).sum()),
                          "anchor_min": float(anchor.min()), "anchor_max": float(anchor.max()),
                          "prediction_share": rng.dirichlet(np.ones(classes)).tolist(),
                          "step_anchors": [{"step": step, "anchor": rng.dirichlet(np.full(classes, 50.0)).tolist()}
                                           for step in (1, 7, 13)]}
                if arm == "oat":
                    record["max_target"] = float(1 / anchor.min() - 1)
                if old:
                    record = {k: v for k, v in record.items() if k not in TELEMETRY
                              and (arm == "oat" or not k.startswith("anchor_"))}
                f.write(json.dumps(record) + "\n")
    return workdir


def _check_png(path):
    """The file is a PNG of a sensible size with something drawn on it."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 500 and image.height >= 350, image.size
        pixels = np.asarray(image.convert("RGB")).astype(np.int32)
    colours = pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]
    assert pixels.std() > 0 and len(np.unique(colours)) > 10


def _restored(workdir, arm, exp):
    checkpoints = ArmCheckpoints(str(workdir), arm)
    try:
        return checkpoints.restore(checkpoints.latest_epoch(), exp.template)
    finally:
        checkpoints.close()


def _check_sweep(workdir, results):
    """The sweep's accuracies are those of evaluation.evaluate on the restored checkpoints at each batch size."""
    exp = Experiment.build(eval_batch_sizes.run_config(str(workdir)))
    assert exp.config.eval_batch_size == 16  # the run's own test batch
    states = _restored(workdir, "oat", exp)
    assert results["checkpoint_epochs"] == {"oat": 3, "ce": 3} and results["test_samples"] == 75
    for size in (1, 8, 32, 128, 0):  # OAT's own decoding, with each test batch's anchor
        assert results["oat"][str(size)] == evaluation.evaluate(exp, states, ("batch",), size or 75)["batch"]
    ce = evaluation.evaluate(exp, _restored(workdir, "ce", exp), ("uniform",))  # at the run's own test batch
    assert results["ce"] == ce["uniform"]
    # At the run's own test batch, the same accuracy as the run logged for its last OAT epoch.
    logged = [r["test_accuracy"] for r in _records(workdir) if r["arm"] == "oat" and r["epoch"] == 3]
    assert evaluation.evaluate(exp, states, ("batch",))["batch"] == logged


def test_every_figure_of_a_real_run_and_its_batch_size_sweep(synthetic_config, tmp_path, capsys):
    # One test, one tiny run (1 epoch of pre-training, then 2 of each arm): under pytest-xdist a fixture
    # shared by several tests could train it once per worker.
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 3, 1
    synthetic_config.learning_rate = 0.003
    workdir = tmp_path / "run"
    train.train_and_evaluate(synthetic_config, str(workdir), report=lambda record: None)
    assert all(key in _records(workdir)[0] for key in TELEMETRY[:3])  # the run logs the anchor telemetry
    assert report.main(["plots", str(workdir)]) == 0
    captured = capsys.readouterr()
    for name in FIGURES:
        assert str(workdir / "plots" / name) in captured.out
        _check_png(workdir / "plots" / name)
    assert "evaluating the OAT checkpoint of epoch 3 in test batches of 1" in captured.err
    results = json.loads((workdir / "eval_batch_sizes.json").read_text())
    _check_sweep(workdir, results)
    assert eval_batch_sizes.evaluate_batch_sizes(str(workdir), sizes=(8, 0)) == results  # reused, not redone
    assert "evaluating" not in capsys.readouterr().err


def test_a_run_from_before_the_telemetry_still_gets_its_accuracy(tmp_path, capsys):
    workdir = _fake_run(tmp_path / "old", old=True)
    assert report.main(["plots", str(workdir), "--out-dir", str(tmp_path / "figures")]) == 0
    err = capsys.readouterr().err
    _check_png(tmp_path / "figures" / "accuracy.png")
    _check_png(tmp_path / "figures" / "anchor_entropy.png")  # OAT's entropy was logged before
    for name in ("anchor_heatmap.png", "prediction_share.png", "eval_batch_size.png"):
        assert not (tmp_path / "figures" / name).exists()
        assert f"note: {name} skipped" in err
    assert "no checkpoint of the OAT arm" in err and "Traceback" not in err
    assert not (workdir / "checkpoints").exists()  # looking for checkpoints created none


def test_several_seeds_are_drawn_as_mean_and_band(tmp_path, capsys):
    workdir = _fake_run(tmp_path / "seeds", seeds=(0, 1, 2), classes=30)
    axes = plots.accuracy_figure(plots.load_run(str(workdir))).axes[0]
    assert len(axes.collections) == 2  # a min-max band per arm
    assert list(axes.lines[0].get_ydata()) == pytest.approx([55.0, 65.0, 75.0])  # the mean over the seeds
    assert report.main(["plots", str(workdir), "--no-eval"]) == 0
    assert "run without --no-eval" in capsys.readouterr().err
    for name in FIGURES[:-1]:
        _check_png(workdir / "plots" / name)


def test_a_folder_without_a_run_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    for workdir, message in ((tmp_path / "empty", "config.json is missing"),
                             (tmp_path / "config_only", "metrics.jsonl is missing"),
                             (tmp_path / "nowhere", "is not a folder")):
        assert report.main(["plots", str(workdir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "empty" / "plots")


def test_batch_sizes_must_be_non_negative_integers(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        report.main(["plots", str(tmp_path), "--batch-sizes", "1,x"])
    assert exit_.value.code == 2 and "non-negative integers" in capsys.readouterr().err


def test_the_accuracy_figure_draws_every_arm_from_the_pretraining(tmp_path):
    """Control arms are drawn beside cross-entropy and OAT, each continuing the pre-training's last epoch."""
    run = plots.load_run(str(_fake_run(tmp_path / "run", seeds=(0,), arms=("ce", "oat", "oat_uniform", "square"))))
    ax = plots.accuracy_figure(run).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"cross-entropy", "OAT", "OAT, uniform anchor", "square loss"} <= set(lines)
    # The pre-training's epoch 1 (60 %), then the arm's epochs 2 and 3 (70 %, 80 %), as logged.
    np.testing.assert_array_equal(lines["square loss"].get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(lines["square loss"].get_ydata(), [60.0, 70.0, 80.0])


def test_every_objective_has_a_colour_and_a_name_of_its_own():
    # An arm missing from the tables took a fallback colour another arm already had (two green lines).
    arms = [PRETRAIN, *objectives.names()]
    assert set(arms) <= set(plots.COLOURS) and set(arms) <= set(plots.NAMES)
    assert len({plots.COLOURS[arm] for arm in arms}) == len({plots.NAMES[arm] for arm in arms}) == len(arms)


def test_the_sweep_figure_zooms_in_beside_a_collapsed_point():
    def selection(scores):
        points = [{"setting": {"learning_rate": rate}, "validation_accuracy": score, "diverged": False}
                  for rate, score in zip((1e-3, 1e-2, 1e-1), scores)]
        return {"score": "balanced validation accuracy",
                "arms": {"oat": {"chosen": {"learning_rate": 1e-3}, "points": points}}}

    [alone] = plots.sweep_figure(selection([85.0, 84.0, 80.0])).axes
    assert alone.get_ylabel() == "balanced validation accuracy (%) at the selected epoch"
    full, zoomed = plots.sweep_figure(selection([85.0, 84.0, 10.0])).axes  # a collapse to chance
    assert full.get_ylim()[0] < 10.0 and zoomed.get_ylim() == (85.0 - 6.0, 85.5)


def test_the_anchor_range_axes_show_plain_values(tmp_path):
    """Values that differ only in their last digits (the released anchor's largest targets, 10.07 to 10.12 for
    C = 10; its entries, about 1/C) are labelled as they are, not as ticks 0.009 under an offset "+1.007e1"."""
    run = plots.load_run(str(_fake_run(tmp_path / "run", seeds=(0,))))
    for record in run.records:
        if record["arm"] == "oat":
            record["max_target"] = 10.07 + 0.003 * record["epoch"]
        if "anchor" in record:
            record["anchor_min"], record["anchor_max"] = 0.2491 + 1e-5 * record["epoch"], 0.2512
    fig = plots.anchor_range_figure(run)
    fig.draw_without_rendering()  # the formatters choose their offset when the ticks are drawn
    anchor_ax, target_ax = fig.axes
    assert target_ax.get_ylabel() == "largest |target|"
    for ax in (anchor_ax, target_ax):
        formatter = ax.yaxis.get_major_formatter()
        assert formatter.get_offset() == "", (ax.get_ylabel(), formatter.get_offset())
        labels = [label.get_text() for label in ax.get_yticklabels() if label.get_text()]
        assert labels and all("e" not in text for text in labels), labels
    target_labels = [float(label.get_text().replace("−", "-")) for label in target_ax.get_yticklabels()
                     if label.get_text()]
    assert 10.0 < min(target_labels) and max(target_labels) < 10.1  # the values themselves, not their last digits
