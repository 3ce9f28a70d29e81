"""python -m oat_jax.report: the paper's layout, pooled seeds, flagged partial runs, clear errors."""
import json

import numpy as np
import pytest

from oat_jax import report, train, workdir
from oat_jax.config_schema import base_config
from oat_jax.paper_figures import paper_cell


def _config(**fields):
    """config.json as train.py writes it: every field of base_config() but the cosmetic ones."""
    config = {k: v for k, v in base_config().to_dict().items() if k not in workdir.COSMETIC_FIELDS}
    return {**config, **fields}


UCF101 = dict(dataset="ucf101", model="resnet18", pretrained_weights="torchvision:resnet18", image_size=224,
              normalisation="imagenet")


def _fake_run(path, table, setting, ce, oat, *, seed=0, final_epoch=None, config=None):
    """A workdir as a finished run leaves it: summary.json (per-seed final accuracies, seeds seed, seed + 1,
    ...) and config.json (by default UCF-101 with ResNet-18, the paper's protocol)."""
    path.mkdir(parents=True)
    config = dict(config or _config(**UCF101), seed=seed, num_seeds=len(ce))
    paper = paper_cell(table, setting).to_dict() if table else None
    final_epoch = final_epoch or config.get("num_epochs", 100)

    def arm(values):
        return {"final_epoch": final_epoch,
                "seeds": {str(seed + k): {"final_test_accuracy": v, "final_epoch": final_epoch}
                          for k, v in enumerate(values)}}

    summary = {"arms": {"ce": arm(ce), "oat": arm(oat)}, "paper": paper,
               "dataset": {"name": config["dataset"], "source": "a folder", "train_samples": 9537,
                           "test_samples": 3783}}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.json").write_text(json.dumps(config))
    return path


def _rows(text, setting, columns=7):
    """The cells of each report row of ``setting``: the accuracy table's (7 columns), or the comparisons (9)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {setting} |")]
    return [row for row in rows if len(row) == columns]


def test_cells_pool_seeds_across_workdirs_and_sit_in_the_papers_tables(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "Table 5", "UCF-101, ResNet-18", [70.0, 71.0], [73.0, 75.5])
    b = _fake_run(tmp_path / "b", "Table 5", "UCF-101, ResNet-18", [72.5], [74.0], seed=2)
    c = _fake_run(tmp_path / "c", "Table 1", "learning rate 0.01", [69.5], [60.25])
    assert report.main([str(c), str(a), str(b)]) == 0
    text = capsys.readouterr().out
    # Table 1 comes before Table 5, as in the paper, whatever the order of the workdirs.
    assert text.index("## Table 1") < text.index("## Table 5")
    ce, oat = [70.0, 71.0, 72.5], [73.0, 75.5, 74.0]
    [cells] = _rows(text, "UCF-101, ResNet-18")
    assert cells[1] == "72.403" and cells[3] == "74.253"  # the paper's Table 5 figures
    assert cells[2] == f"{np.mean(ce):.3f} ± {np.std(ce, ddof=1):.3f}"
    assert cells[4] == f"{np.mean(oat):.3f} ± {np.std(oat, ddof=1):.3f}"
    assert cells[5] == "3" and cells[6] == ""
    assert "| learning rate 0.01 | 70.288 | 69.500 | 59.397 | 60.250 | 1 |" in text
    # OAT against cross-entropy paired by seed over the pooled runs: differences 3, 4.5, 1.5 (mean 3, standard
    # error 1.5 / sqrt 3). With 2 degrees of freedom the t distribution has closed forms: quantile q is
    # (2q - 1) / sqrt(2q(1 - q)), and the two-sided p of t is 1 - t / sqrt(t² + 2).
    error, quantile = 1.5 / np.sqrt(3), 0.95 / np.sqrt(2 * 0.975 * 0.025)
    t = 3 / error
    # Equivalence within ±0.3 (two one-sided tests): the larger p is that of the mean not being below +0.3,
    # the t(2) distribution function at (3 - 0.3) / error, 1/2 + t / (2 sqrt(t² + 2)). One comparison: Holm's
    # p is the raw one; neither rejects at 0.05, so the verdict is inconclusive.
    upper = (3 - 0.3) / error
    p_value = f"{1 - t / np.sqrt(t * t + 2):.3g}"
    assert _rows(text, "UCF-101, ResNet-18", columns=9) == [[
        "UCF-101, ResNet-18", "oat", "+3.000", f"[{3 - quantile * error:+.3f}, {3 + quantile * error:+.3f}]",
        p_value, p_value, f"{0.5 + upper / (2 * np.sqrt(upper ** 2 + 2)):.3g}", "3 of 3", "inconclusive"]]
    assert _rows(text, "learning rate 0.01", columns=9) == [
        ["learning rate 0.01", "oat", "-9.250", "–", "–", "–", "–", "0 of 1", "inconclusive"]]


def test_partial_runs_are_flagged_not_passed_off_as_results(tmp_path, capsys):
    run = _fake_run(tmp_path / "short", "Table 6", "ERA, ViT-L/16", [50.0], [51.0], final_epoch=12,
                    config=_config(**UCF101, train_limit=100))
    out = tmp_path / "report.md"
    assert report.main([str(run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    assert "short: subset" in text and "short: ce at epoch 12 of 100" in text


def test_a_real_run_is_reported(tmp_path, synthetic_config, capsys):
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs, synthetic_config.num_seeds = 2, 1, 2
    synthetic_config.paper = paper_cell("Table 4", "CIFAR-10, lightweight CNN")
    summary = train.train_and_evaluate(synthetic_config, str(tmp_path / "run"), report=lambda record: None)
    assert report.main([str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    ce = [s["final_test_accuracy"] for s in summary["arms"]["ce"]["seeds"].values()]
    assert f"{np.mean(ce):.3f} ± {np.std(ce, ddof=1):.3f}" in text
    assert "stand-in data, not a result" in text


def test_runs_of_different_configs_are_rows_of_their_own_naming_the_differences(tmp_path, capsys):
    # The report: a 4-epoch full-data run and a 2-epoch 2,000-sample run, both seed 0.
    default = _fake_run(tmp_path / "default", None, None, [80.0], [81.0],
                        config=_config(num_epochs=4, pretrain_epochs=2))
    fmnist = _fake_run(tmp_path / "fmnist", None, None, [60.0], [62.0],
                       config=_config(num_epochs=2, pretrain_epochs=1, train_limit=2000))
    assert report.main([str(default), str(fmnist)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out, "fashion_mnist, lightweight")
    assert [row[2:6] for row in rows] == [["80.000", "–", "81.000", "1"], ["60.000", "–", "62.000", "1"]]
    assert "differs" not in rows[0][6]
    assert "differs: num_epochs=2, pretrain_epochs=1, train_limit=2000" in rows[1][6]
    # Tables without the notes column name the second row by what sets it apart.
    [first] = _rows(out, "fashion_mnist, lightweight", columns=9)
    [second] = _rows(out, "fashion_mnist, lightweight (num_epochs=2, pretrain_epochs=1, train_limit=2000)", columns=9)
    assert (first[1], first[2], second[1], second[2]) == ("oat", "+1.000", "oat", "+2.000")


def test_seeds_of_one_config_pool_whatever_their_cosmetic_fields(tmp_path, capsys):
    # A cosmetic field may differ; runs at another learning rate or initialisation stay out of the pooled row.
    a = _fake_run(tmp_path / "a", None, None, [70.0], [72.0], seed=0, config=_config(init="flax"))
    b = _fake_run(tmp_path / "b", None, None, [74.0], [73.0], seed=1, config=_config(progress=False, init="flax"))
    c = _fake_run(tmp_path / "c", None, None, [10.0], [10.0], seed=2,
                  config=_config(learning_rate=0.01, init="flax"))
    d = _fake_run(tmp_path / "d", None, None, [20.0], [20.0], seed=3, config=_config())
    assert report.main([str(a), str(b), str(c), str(d)]) == 0
    rows = _rows(capsys.readouterr().out, "fashion_mnist, lightweight")
    assert len(rows) == 3 and rows[2][6] == "differs: init='torch'"
    assert rows[0][2] == f"{np.mean([70.0, 74.0]):.3f} ± {np.std([70.0, 74.0], ddof=1):.3f}"
    assert rows[0][4] == f"{np.mean([72.0, 73.0]):.3f} ± {np.std([72.0, 73.0], ddof=1):.3f}"
    assert rows[0][5] == "2" and rows[0][6] == ""
    assert rows[1][2] == "10.000" and rows[1][6] == "differs: learning_rate=0.01"


def test_the_same_seed_is_never_counted_twice(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "Table 5", "UCF-101, ResNet-18", [70.0, 71.0], [73.0, 75.0], seed=0)
    b = _fake_run(tmp_path / "b", "Table 5", "UCF-101, ResNet-18", [72.0], [74.0], seed=1)
    assert report.main([str(a), str(b)]) == 0
    rows = _rows(capsys.readouterr().out, "UCF-101, ResNet-18")
    assert [row[5] for row in rows] == ["2", "1"]
    assert rows[0][2] == f"{np.mean([70.0, 71.0]):.3f} ± {np.std([70.0, 71.0], ddof=1):.3f}"
    assert rows[1][2] == "72.000" and rows[1][6] == "repeats seed 1"


def test_folders_that_cannot_be_reported_are_skipped_with_a_note(tmp_path, capsys):
    run = _fake_run(tmp_path / "done", "Table 5", "UCF-101, ResNet-18", [70.0], [73.0])
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text(json.dumps(_config()))
    broken = _fake_run(tmp_path / "broken", "Table 5", "UCF-101, ResNet-18", [1.0], [1.0], seed=1)
    (broken / "config.json").write_text("{not json")
    assert report.main([str(tmp_path / "unfinished"), str(run), str(broken)]) == 0
    out, err = capsys.readouterr()
    unfinished, corrupt = err.splitlines()
    assert unfinished == f"note: skipping {tmp_path / 'unfinished'}: no summary.json (an unfinished or refused run)"
    assert corrupt.startswith(f"note: skipping {broken}: config.json is not valid JSON (")
    assert [row[2:6] for row in _rows(out, "UCF-101, ResNet-18")] == [["70.000", "74.253", "73.000", "1"]]


def test_nothing_to_report_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), str(tmp_path / "typo")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: nothing to report: ") and "empty: no summary.json" in err
    assert "typo: not a folder" in err


def test_runs_shorter_than_the_papers_protocol_are_flagged(tmp_path, capsys):
    quick = _fake_run(tmp_path / "quick", None, None, [80.0], [81.0],
                      config=_config(num_epochs=4, pretrain_epochs=2))
    # Table 3 varies the pre-training: 0 epochs is its protocol, 10 is short of the 20-epoch cell.
    none = _fake_run(tmp_path / "none", "Table 3", "0 pre-training epochs", [72.0], [72.5],
                     config=_config(**UCF101, pretrain_epochs=0))
    ten = _fake_run(tmp_path / "ten", "Table 3", "20 pre-training epochs", [72.0], [73.0])
    assert report.main([str(quick), str(none), str(ten)]) == 0
    text = capsys.readouterr().out
    notes = _rows(text, "fashion_mnist, lightweight")[0][6]
    assert notes == "quick: 4 of 100 epochs; quick: 2 of 10 pre-training epochs"
    assert _rows(text, "0 pre-training epochs")[0][6] == ""
    assert _rows(text, "20 pre-training epochs")[0][6] == "ten: 10 of 20 pre-training epochs"


def test_unknown_paper_cells_are_refused_with_the_known_ones():
    with pytest.raises(KeyError, match="Table 5: UCF-101, ResNet-18"):
        paper_cell("Table 5", "UCF-101, ResNet-19")


def test_runs_of_other_arms_pool_into_one_row_each_arm_with_its_own_seeds(tmp_path, capsys):
    old = _fake_run(tmp_path / "old", None, None, [70.0], [72.0], seed=0, config=_config())
    new_config = _config(arms="ce,oat,ce_smooth")
    new = _fake_run(tmp_path / "new", None, None, [74.0], [73.0], seed=1, config=new_config)
    only_ce = _fake_run(tmp_path / "only_ce", None, None, [10.0], [], seed=2, config=_config(arms="ce"))
    summary = json.loads((new / "summary.json").read_text())
    summary["arms"]["ce_smooth"] = {"final_epoch": 100, "seeds": {"1": {"final_test_accuracy": 71.5,
                                                                        "final_epoch": 100}}}
    (new / "summary.json").write_text(json.dumps(summary))
    summary = json.loads((only_ce / "summary.json").read_text())
    del summary["arms"]["oat"]
    (only_ce / "summary.json").write_text(json.dumps(summary))
    # A run of both arms, a run with a third arm and a cross-entropy-only run, of one config apart from
    # seeds and arms: one row of 3 seeds, an arm with fewer saying how many.
    assert report.main([str(old), str(new), str(only_ce)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out, "fashion_mnist, lightweight")
    assert len(rows) == 1 and rows[0][5] == "3"
    assert rows[0][2] == f"{np.mean([70.0, 74.0, 10.0]):.3f} ± {np.std([70.0, 74.0, 10.0], ddof=1):.3f}"
    assert rows[0][4] == f"{np.mean([72.0, 73.0]):.3f} ± {np.std([72.0, 73.0], ddof=1):.3f} (2 of 3 seeds)"
    assert rows[0][6] == "ce_smooth: 71.500 (1 of 3 seeds)"
    # A later run of one more arm for seeds already there joins them: paired with cross-entropy by seed.
    extra = _fake_run(tmp_path / "extra", None, None, [], [], seed=0, config=new_config | {"arms": "ce_smooth"})
    summary = json.loads((extra / "summary.json").read_text())
    summary["arms"] = {"ce_smooth": {"final_epoch": 100, "seeds": {"0": {"final_test_accuracy": 69.0,
                                                                         "final_epoch": 100}}}}
    (extra / "summary.json").write_text(json.dumps(summary))
    assert report.main([str(old), str(new), str(extra)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out, "fashion_mnist, lightweight")
    assert len(rows) == 1 and rows[0][5] == "2" and rows[0][6] == f"ce_smooth: {np.mean([69.0, 71.5]):.3f} ± " \
        f"{np.std([69.0, 71.5], ddof=1):.3f}"
    # ce_smooth - ce: seed 0 69 - 70 = -1, seed 1 71.5 - 74 = -2.5; mean -1.75, no win.
    assert "| fashion_mnist, lightweight | ce_smooth | -1.750 |" in out and "| 0 of 2 |" in out
    # The same arm and seed twice: a row of its own.
    assert report.main([str(old), str(new), str(extra), str(extra)]) == 0
    rows = _rows(capsys.readouterr().out, "fashion_mnist, lightweight")
    assert len(rows) == 2 and rows[1][6] == "ce_smooth: 69.000; repeats seed 0"


def test_the_final_epochs_four_decodings_are_tabled_over_seeds(tmp_path, capsys):
    runs = []
    for seed, (batch, single) in enumerate(((80.0, 79.0), (82.0, 80.0))):
        run = _fake_run(tmp_path / f"s{seed}", None, None, [70.0], [81.0], seed=seed, config=_config())
        summary = json.loads((run / "summary.json").read_text())
        decodes = {"batch": batch, "single": single, "train_anchor": 78.0, "uniform": 77.0}
        summary["arms"]["oat"]["seeds"][str(seed)]["final_test_accuracy_by_decode"] = decodes
        (run / "summary.json").write_text(json.dumps(summary))
        runs.append(str(run))
    assert report.main(runs) == 0
    out = capsys.readouterr().out
    assert "The final epoch's test accuracy (of all test images, whatever the score above) decoded four ways" in out
    rows = [line for line in out.splitlines() if line.startswith("| fashion_mnist, lightweight | oat |")]
    # The comparison with cross-entropy (+11 on both seeds) and the decodings; ce logged none, so has no row.
    assert rows[1] == (f"| fashion_mnist, lightweight | oat | 81.000 ± {np.std([80.0, 82.0], ddof=1):.3f} | "
                       f"79.500 ± {np.std([79.0, 80.0], ddof=1):.3f} | 78.000 ± 0.000 | 77.000 ± 0.000 |")
    # +11 on both seeds: no spread to test against, so no interval, no p and no verdict but inconclusive.
    assert rows[0] == "| fashion_mnist, lightweight | oat | +11.000 | – | no spread | – | – | 2 of 2 | inconclusive |"


def _run_with_controls(path):
    """A run of OAT (72, 73, 75 on seeds 0-2) and cross-entropy (70, 74, 72) with two controls: oat_uniform
    1, 2 and 3 points below OAT on seeds 0, 1, 2; square on seeds 0 and 2 only."""
    run = _fake_run(path, None, None, [70.0, 74.0, 72.0], [72.0, 73.0, 75.0], config=_config())
    summary = json.loads((run / "summary.json").read_text())
    for arm, per_seed in {"oat_uniform": {"0": 71.0, "1": 71.0, "2": 72.0}, "square": {"0": 73.0, "2": 75.0}}.items():
        summary["arms"][arm] = {"final_epoch": 100, "seeds": {seed: {"final_test_accuracy": value, "final_epoch": 100}
                                                             for seed, value in per_seed.items()}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_oat_is_paired_with_each_of_its_controls_by_seed(tmp_path, capsys):
    run = _run_with_controls(tmp_path / "run")
    assert report.main([str(run)]) == 0
    out = capsys.readouterr().out
    controls = out[out.index("OAT against its controls"):].split("\n\n")[1]
    rows = _rows(controls, "fashion_mnist, lightweight", columns=9)
    # Differences 1, 2, 3: mean 2, standard error 1/sqrt(3); t(2) quantile 4.303 -> 2 ± 2.484. With 2 degrees of
    # freedom the t tail is closed-form, P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2, here t = sqrt(12): p = 0.0742.
    low, high = (float(x) for x in rows[0][3].strip("[]").split(","))
    assert rows[0][:3] == ["fashion_mnist, lightweight", "oat_uniform", "+2.000"]
    assert low == pytest.approx(2 - 2.484, abs=2e-3) and high == pytest.approx(2 + 2.484, abs=2e-3)
    assert float(rows[0][4]) == pytest.approx(1 - np.sqrt(12) / np.sqrt(14), abs=1e-3) and rows[0][7] == "3 of 3"
    # square only on seeds 0 and 2: 72 - 73 and 75 - 75.
    assert rows[1][:3] == ["fashion_mnist, lightweight", "square", "-0.500"] and rows[1][7] == "0 of 2"
    assert len(rows) == 2  # no ce_smooth arm, no row


def test_the_comparison_figure_draws_each_seed_and_the_interval(tmp_path, capsys):
    run = _run_with_controls(tmp_path / "run")
    figure = tmp_path / "comparisons.png"
    assert report.main([str(run), "--figure", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from oat_jax import plots
    cell, = report.collect(report.load_runs([str(run)])[0])
    ax, = plots.comparison_figure([("row", report.paired_results(cell))]).axes
    labels = [tick.get_text() for tick in ax.get_yticklabels()]
    assert ax.get_xlabel().startswith("difference in final-epoch test accuracy (percentage points)")
    # Top to bottom: each arm against cross-entropy, then OAT against its controls (the tables' order).
    assert labels[::-1] == ["oat − ce", "oat_uniform − ce", "square − ce", "oat − oat_uniform", "oat − square"]
    row = labels.index("oat − oat_uniform")
    dots = next(c for c in ax.collections if c.get_offsets()[0][1] == row).get_offsets()
    assert sorted(dots[:, 0]) == [1.0, 2.0, 3.0]  # the seeds' differences, by hand
    bar = next(c for c in ax.containers if c.lines[0].get_ydata()[0] == row)
    (low, _), (high, _) = bar.lines[2][0].get_segments()[0]
    assert low == pytest.approx(2 - 2.484, abs=2e-3) and high == pytest.approx(2 + 2.484, abs=2e-3)
    # Nothing to compare (cross-entropy alone): a note, no file.
    alone = _fake_run(tmp_path / "alone", None, None, [70.0], [71.0], config=_config(arms="ce"))
    summary = json.loads((alone / "summary.json").read_text())
    del summary["arms"]["oat"]
    (alone / "summary.json").write_text(json.dumps(summary))
    assert report.main([str(alone), "--figure", str(tmp_path / "none.png")]) == 0
    assert not (tmp_path / "none.png").exists() and "no row has two arms that share a seed" in capsys.readouterr().err


def test_holm_equivalence_and_verdicts_by_hand():
    from oat_jax import paired
    # Holm: sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, then max(0.06, 0.04) = 0.06.
    assert paired.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert paired.holm([None, 0.02]) == [None, 0.02]
    # TOST on differences 0.1, 0.2, 0: mean 0.1, standard error 0.1 / sqrt 3. With 2 degrees of freedom:
    # P(T > t) = (1 - t / sqrt(t² + 2)) / 2. The upper test, t = (0.1 - 0.3) / error, decides.
    error = 0.1 / np.sqrt(3)
    upper = (0.1 - 0.3) / error
    expected = (1 + upper / np.sqrt(upper ** 2 + 2)) / 2
    assert paired.equivalence_p_value([0.1, 0.2, 0.0], 0.3) == pytest.approx(expected) and expected < 0.05
    assert paired.equivalence_p_value([0.5, 0.5], 0.3) is None and paired.equivalence_p_value([1.0], 0.3) is None
    better, worse = {"mean_difference": 1.0}, {"mean_difference": -1.0}
    assert paired.verdict(better, 0.01, None) == "better" and paired.verdict(worse, 0.04, 0.9) == "worse"
    assert paired.verdict(better, 0.2, 0.01) == "equivalent" and paired.verdict(better, 0.2, 0.2) == "inconclusive"
    assert paired.verdict(better, None, None) == "inconclusive"


def _validated_run(path, ce, oat, selected_ce, selected_oat):
    """A run with a validation split: final and validation-selected test accuracies per seed."""
    run = _fake_run(path, None, None, ce, oat, config=_config(validation_size=6000.0))
    summary = json.loads((run / "summary.json").read_text())
    for arm, values in (("ce", selected_ce), ("oat", selected_oat)):
        for seed, value in zip(summary["arms"][arm]["seeds"], values):
            summary["arms"][arm]["seeds"][seed].update(test_accuracy_at_selected_epoch=value, selected_epoch=40)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_a_contrast_no_row_makes_is_refused_in_one_line(tmp_path, capsys):
    # Misspelt or reversed, it would otherwise leave the family silently, and Holm would adjust over fewer.
    run = _validated_run(tmp_path / "v", [70.0, 71.0], [70.5, 71.0], [71.0, 72.0], [73.0, 73.5])
    for contrasts in ("oat-ce,oat-ce_smoth", "ce-oat"):
        assert report.main([str(run), "--contrasts", contrasts]) == 2
        captured = capsys.readouterr()
        assert not captured.out and captured.err.count("\n") == 1
        named = contrasts.split(",")[-1]  # the offending one alone
        assert captured.err.startswith(f"error: --contrasts {named}: no row") and "oat-ce" in captured.err


def test_the_report_compares_under_the_validation_rule_and_says_so(tmp_path, capsys):
    run = _validated_run(tmp_path / "v", [70.0, 71.0, 72.0], [70.5, 71.0, 73.0], [71.0, 72.0, 73.0],
                         [73.0, 73.5, 75.0])
    assert report.main([str(run), "--contrasts", "oat-ce"]) == 0
    out = capsys.readouterr().out
    assert "Ours: test accuracy at the validation-selected epoch" in out
    [cells] = _rows(out, "fashion_mnist, lightweight")
    assert cells[2] == f"{np.mean([71.0, 72.0, 73.0]):.3f} ± 1.000"
    [comparison] = _rows(out, "fashion_mnist, lightweight", columns=9)
    assert comparison[2] == "+1.833"  # differences 2, 1.5, 2 at the selected epochs (not the final 0.5, 0, 1)
    assert report.main([str(run), "--select", "final"]) == 0
    out = capsys.readouterr().out
    assert "Ours: final-epoch test accuracy" in out
    assert _rows(out, "fashion_mnist, lightweight", columns=9)[0][2] == "+0.500"
    # A run without a validation split cannot be read under the validation rule: skipped, saying how.
    plain = _fake_run(tmp_path / "plain", None, None, [70.0], [71.0], config=_config())
    assert report.main([str(run), str(plain), "--select", "validation"]) == 0
    assert "no validation split to select an epoch on; report it with --select final" in capsys.readouterr().err
    # Without --select, a mix is reported under the final rule.
    assert report.main([str(run), str(plain)]) == 0
    assert "Ours: final-epoch test accuracy" in capsys.readouterr().out


def test_the_sweep_section_lists_each_arms_choice(tmp_path, capsys):
    run = _validated_run(tmp_path / "v", [70.0], [71.0], [71.0], [72.0])
    points = [{"setting": {"learning_rate": lr}, "seed": 100, "workdir": f"learning_rate={lr}/seed_100",
               "validation_accuracy": accuracy, "selected_epoch": epoch, "diverged": accuracy is None}
              for lr, accuracy, epoch in ((0.001, 80.0, 61), (0.01, 85.0, 33), (0.1, None, None))]
    selection = {"rule": "highest validation accuracy", "grid": {"learning_rate": [0.001, 0.01, 0.1]},
                 "arms": {"ce": {"chosen": {"learning_rate": 0.01}, "at_edge": False, "validation_accuracy": 85.0,
                                 "points": points},
                          "oat": {"chosen": None, "at_edge": False, "points": points[2:]}}}
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "selection.json").write_text(json.dumps(selection))
    figure = tmp_path / "sweep.png"
    assert report.main([str(run), "--sweep", str(tmp_path / "sweep"), "--sweep-figure", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "| ce | learning_rate=0.01 | 85.00 | 33 | 3 (1) | no | 40.0 |" in out
    assert "| oat | none: diverged everywhere | – | – | 1 (1) | – | – |" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Chosen on validation accuracy only" in out  # a selection.json from before it named its score
    selection["score"] = "balanced validation accuracy"  # an imbalanced training set's stopping rule
    (tmp_path / "sweep" / "selection.json").write_text(json.dumps(selection))
    assert report.main([str(run), "--sweep", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "Chosen on balanced validation accuracy only" in out and "| chosen | balanced validation accuracy |" in out
    assert report.main([str(run), "--sweep", str(tmp_path / "nothing")]) == 2
    assert "no readable selection.json" in capsys.readouterr().err


def test_accuracy_by_epoch_pools_seeds_and_labels_the_oracle(tmp_path, capsys):
    run = _fake_run(tmp_path / "r", None, None, [70.0, 71.0], [72.0, 73.0], config=_config(num_epochs=3))
    lines = [{"arm": "pretrain", "epoch": 1, "seed": s, "test_accuracy": 50.0 + s} for s in (0, 1)]
    lines += [{"arm": arm, "epoch": e, "seed": s, "test_accuracy": base + 10 * e + s}
              for arm, base in (("ce", 40.0), ("oat", 45.0)) for e in (2, 3) for s in (0, 1)]
    lines.append({"arm": "oat", "epoch": 3, "seed": 0, "event": "diverged"})  # events are not epochs
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert report.main([str(run), "--by-epoch", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "each seed's epoch of highest test accuracy, is an oracle" in out
    # ce's history starts with the pre-training (50.5 at epoch 1); oat has no epoch 1.
    assert "| ce | 50.50 | 70.50 | 3–3 |" in out and "| oat | – | 75.50 | 3–3 |" in out
    assert report.main([str(run), "--by-epoch", "x"]) == 2


def test_the_curves_give_every_arm_its_runs_pretraining_and_draw_both_scores(tmp_path, capsys):
    run = _fake_run(tmp_path / "r", None, None, [70.0, 71.0], [72.0, 73.0], config=_config(num_epochs=3))
    lines = [{"arm": "pretrain", "epoch": 1, "seed": s, "test_accuracy": 50.0 + s, "val_accuracy": 55.0}
             for s in (0, 1)]
    lines += [{"arm": arm, "epoch": e, "seed": s, "test_accuracy": base + 10 * e + s, "val_accuracy": base}
              for arm, base in (("ce", 40.0), ("oat", 45.0)) for e in (2, 3) for s in (0, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    runs, _ = report.load_runs([str(run)])
    assert report.epoch_histories(runs, whole=True)["oat"] == {"0": {1: 50.0, 2: 65.0, 3: 75.0},
                                                               "1": {1: 51.0, 2: 66.0, 3: 76.0}}
    assert 1 not in report.epoch_histories(runs)["oat"]["0"]  # the table's histories: pre-training is ce's
    assert report.epoch_histories(runs, "val_accuracy", whole=True)["ce"]["1"] == {1: 55.0, 2: 40.0, 3: 40.0}
    figure = tmp_path / "curves.png"
    assert report.main([str(run), "--curves", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run / "metrics.jsonl").write_text("")
    assert report.main([str(run), "--curves", str(tmp_path / "none.png")]) == 0
    assert "none.png not written" in capsys.readouterr().err and not (tmp_path / "none.png").exists()


def test_an_imbalanced_run_is_broken_down_by_class_frequency_at_each_seeds_epoch(tmp_path, capsys, monkeypatch):
    run = _fake_run(tmp_path / "r", None, None, [70.0, 71.0], [72.0, 73.0],
                    config=_config(num_epochs=3, train_imbalance=100))
    summary = json.loads((run / "summary.json").read_text())
    for arm, epochs in (("ce", (1, 3)), ("oat", (3, 2))):  # each seed's validation-selected epoch
        for seed, epoch in zip(("0", "1"), epochs):
            summary["arms"][arm]["seeds"][seed].update(selected_epoch=epoch, test_accuracy_at_selected_epoch=60.0)
    (run / "summary.json").write_text(json.dumps(summary))

    def figures(arm, epoch, seed):  # distinct per arm, epoch and seed: many, medium, few, balanced
        base = {"pretrain": 0, "ce": 100, "oat": 200}[arm] + 10 * epoch + seed
        return {"test_accuracy_many": base, "test_accuracy_medium": base + 0.25, "test_accuracy_few": base + 0.5,
                "test_balanced_accuracy": base + 0.75}

    lines = [{"arm": "pretrain", "epoch": 1, "seed": s, "test_accuracy": 50.0, **figures("pretrain", 1, s)}
             for s in (0, 1)]
    lines += [{"arm": arm, "epoch": e, "seed": s, "test_accuracy": 50.0, **figures(arm, e, s)}
              for arm in ("ce", "oat") for e in (2, 3) for s in (0, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert report.main([str(run), "--select", "validation"]) == 0
    out = capsys.readouterr().out
    assert "at each seed's validation-selected epoch over the most frequent" in out
    # ce: seed 0 at epoch 1 of the pre-training (10), seed 1 at its epoch 3 (131); oat: 230 and 221.
    assert "| ce | 70.500 ± 85.560 | 70.750 ± 85.560 | 71.000 ± 85.560 | 71.250 ± 85.560 | 2 |" in out
    assert "| oat | 225.500 ± 6.364 | 225.750 ± 6.364 | 226.000 ± 6.364 | 226.250 ± 6.364 | 2 |" in out
    from oat_jax import plots
    drawn = []  # the comparison figure's axis names the score the report compared
    monkeypatch.setattr(plots, "write_comparison_figure", lambda groups, path, score: drawn.append(score))
    assert report.main([str(run), "--select", "validation", "--figure", "x.png"]) == 0
    assert drawn == ["test accuracy at the validation-selected epoch"]
    assert report.Comparing("validation", metric="balanced").score_in_brief == \
        "balanced test accuracy at the validation-selected epoch"
    capsys.readouterr()
    assert report.main([str(run), "--select", "final"]) == 0
    out = capsys.readouterr().out  # every seed at epoch 3: ce 130 and 131, oat 230 and 231
    assert "each seed's final epoch" in out and "| ce | 130.500 ± 0.707 |" in out and "| oat | 230.500 ± 0.707 |" in out
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "train_imbalance": 1}))  # balanced: thirds arbitrary
    assert report.main([str(run), "--select", "final"]) == 0
    assert "By class frequency" not in capsys.readouterr().out


def test_outputs_go_into_new_folders_and_an_unwritable_one_is_one_line_before_any_work(tmp_path, capsys):
    run = _fake_run(tmp_path / "r", None, None, [70.0, 71.0], [72.0, 73.0])
    out = tmp_path / "new" / "nested" / "report.md"
    assert report.main([str(run), "--out", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out
    (tmp_path / "a_file").write_text("")
    for option, name in (("--out", "report.md"), ("--figure", "comparison.png")):
        assert report.main([str(run), option, str(tmp_path / "a_file" / name)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"error: cannot write {tmp_path / 'a_file' / name}: ")
        assert len(captured.err.splitlines()) == 1
    (run / "metrics.jsonl").write_text(json.dumps({"arm": "ce", "epoch": 1, "seed": 0, "test_accuracy": 70.0}) + "\n")
    assert report.main(["plots", str(run), "--out-dir", str(tmp_path / "a_file" / "plots")]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write the figures to {tmp_path / 'a_file' / 'plots'}: ")
