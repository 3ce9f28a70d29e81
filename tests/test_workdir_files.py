"""oat_jax.workdir's files: a config's identity, config.json read, checked and recorded, and the summary of
any arms."""
import json
import math
import subprocess
import sys

import pytest

from oat_jax import workdir
from oat_jax.config_schema import base_config
from oat_jax.paired import paired_comparison


def _config(**fields):
    """A config's ``to_dict()``."""
    return {**base_config().to_dict(), **fields}


def _recorded(**fields):
    """config.json as a run records it: every field but the cosmetic ones."""
    return {k: v for k, v in _config(**fields).items() if k not in workdir.COSMETIC_FIELDS}


def _workdir(path, record, trained=True):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(record))
    if trained:
        (path / "metrics.jsonl").write_text("")
    return path


def test_identity_drops_the_cosmetic_fields_and_the_spaces_between_arms():
    config = {"learning_rate": 0.01, "arms": " oat, oat_uniform", "progress": True, "steps_in_flight": 2,
              "distributed": {"num_processes": 0}, "stall_timeout_seconds": 30.0}
    assert workdir.identity(config) == {"learning_rate": 0.01, "arms": "oat,oat_uniform"}
    assert workdir.identity({"seed": 3}) == {"seed": 3}


def test_read_config_reads_config_json_as_it_is(tmp_path):
    record = _recorded(dataset="cifar10", retired_field=7)
    _workdir(tmp_path / "run", record, trained=False)
    assert workdir.read_config(str(tmp_path / "run")) == record  # a field unknown to this version kept


def test_read_config_errors_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(workdir.WorkdirError, match=r"^config\.json is missing: is this an oat_jax workdir\?$"):
        workdir.read_config(str(tmp_path / "empty"))
    with pytest.raises(workdir.WorkdirError, match=r"^config\.json is not a JSON object$"):
        workdir.read_config(str(tmp_path / "list"))
    with pytest.raises(workdir.WorkdirError, match=r"^config\.json is not valid JSON \(Expecting property name"):
        workdir.read_config(str(tmp_path / "broken"))
    with pytest.raises(workdir.WorkdirError, match=r"^no summary\.json \(an unfinished or refused run\)$"):
        workdir.read_summary(str(tmp_path / "empty"))


def test_check_config_accepts_the_same_run_whatever_its_cosmetic_fields(tmp_path):
    record = _recorded()
    run = _workdir(tmp_path / "run", record)
    workdir.check_config(str(run), _config())
    workdir.check_config(str(run), _config(progress=False, steps_in_flight=0))  # cosmetic fields may change
    workdir.check_config(str(run), _config(arms="ce, oat"))
    assert json.loads((run / "config.json").read_text()) == record  # read only


def test_check_config_refuses_a_changed_field_naming_it(tmp_path):
    run = _workdir(tmp_path / "run", _recorded())
    expected = (f"workdir {run} holds a run with a different config (fields: {{}}); rerun with the same config "
                "to resume it, or pass a new --workdir to start fresh")
    with pytest.raises(workdir.WorkdirMismatch) as error:
        workdir.check_config(str(run), _config(learning_rate=0.01))
    assert str(error.value) == expected.format("learning_rate (recorded 0.001, now 0.01)")
    with pytest.raises(workdir.WorkdirMismatch) as error:
        workdir.check_config(str(run), _config(arms="oat", anchor_scope="device"))
    assert str(error.value) == expected.format("anchor_scope (recorded 'global', now 'device'), arms (recorded "
                                               "'ce,oat', now 'oat')")
    # A field config.json lacks is a change too: nothing is assumed of it.
    lacking = _workdir(tmp_path / "lacking", {k: v for k, v in _recorded().items() if k != "anchor_scope"})
    with pytest.raises(workdir.WorkdirMismatch, match=r"\(fields: anchor_scope \(recorded None, now 'global'\)\)"):
        workdir.check_config(str(lacking), _config())


def test_check_config_lets_a_new_config_take_a_folder_without_a_trained_run(tmp_path):
    untrained = _workdir(tmp_path / "config_only", {"learning_rate": 0.5}, trained=False)
    workdir.check_config(str(untrained), _config())
    workdir.check_config(str(tmp_path / "nowhere"), _config())
    broken = _workdir(tmp_path / "broken", {})
    (broken / "config.json").write_text("[]")
    with pytest.raises(workdir.WorkdirMismatch) as error:
        workdir.check_config(str(broken), _config())
    assert str(error.value) == (f"workdir {broken} holds a run whose config.json is not a JSON object; pass a new "
                                "--workdir to start fresh")


def test_record_config_writes_all_but_the_cosmetic_fields_and_keeps_an_equal_record(tmp_path):
    config = {"learning_rate": 0.01, "arms": "ce,oat", "progress": True, "steps_in_flight": 2,
              "stall_timeout_seconds": 30.0, "distributed": {"num_processes": 0}, "paper": {"table": ""}}
    run = tmp_path / "new" / "run"
    workdir.record_config(str(run), config)
    recorded = {"learning_rate": 0.01, "arms": "ce,oat", "paper": {"table": ""}}
    assert json.loads((run / "config.json").read_text()) == recorded
    (run / "config.json").write_text(json.dumps(recorded))  # compact: rewriting would indent it
    workdir.record_config(str(run), {**config, "progress": False})
    assert (run / "config.json").read_text() == json.dumps(recorded)
    workdir.record_config(str(run), {**config, "learning_rate": 0.1})
    assert json.loads((run / "config.json").read_text()) == {**recorded, "learning_rate": 0.1}
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # no temporary file left


def _record(arm, epoch, seed, accuracy):
    return {"arm": arm, "epoch": epoch, "seed": seed, "test_accuracy": accuracy, "train_loss": 1.0}


def test_summarise_any_arms_ce_continuing_the_pretraining():
    records = [_record("pretrain", 1, 0, 70.0), _record("pretrain", 1, 1, 50.0)]
    for seed, per_arm in ((0, {"ce": (60.0, 65.0), "oat": (66.0, 64.0), "ce_smooth": (61.0, 63.0)}),
                          (1, {"ce": (55.0, 57.0), "oat": (68.0, 70.0), "ce_smooth": (62.0, 61.0)})):
        for arm, accuracies in per_arm.items():
            records += [_record(arm, epoch, seed, accuracy) for epoch, accuracy in zip((2, 3), accuracies)]
    summary = workdir.summarise(records, ["ce", "oat", "ce_smooth", "oat_uniform"], {"table": ""})
    # Each arm against cross-entropy, paired by seed. Differences of final accuracies: oat -1 and 13 (mean 6,
    # standard error 7), ce_smooth -2 and 4 (mean 1, error 3). With one degree of freedom the t distribution is
    # Cauchy's: quantile 0.975 = tan(0.475 pi), two-sided p = 1 - 2 atan(|t|) / pi.
    quantile = math.tan(0.475 * math.pi)
    for arm, mean, error in (("oat", 6.0, 7.0), ("ce_smooth", 1.0, 3.0)):
        assert summary["arms"][arm].pop("vs_ce") == {
            "mean_difference": pytest.approx(mean), "seeds": 2, "wins": 1,
            "ci95": pytest.approx([mean - quantile * error, mean + quantile * error]),
            "p_value": pytest.approx(1 - 2 * math.atan(mean / error) / math.pi), "select": "final"}
    assert "vs_ce" not in summary["arms"]["ce"]
    assert summary["paper"] is None and list(summary["arms"]) == ["ce", "oat", "ce_smooth"]  # no epoch: left out
    # Cross-entropy's history starts with the pre-training: seed 0's best (by test accuracy: an oracle, never
    # compared) is its pre-training epoch 1.
    assert summary["arms"]["ce"] == {
        "seeds": {"0": {"final_test_accuracy": 65.0, "final_epoch": 3, "oracle_best_test_accuracy": 70.0, "oracle_best_epoch": 1},
                  "1": {"final_test_accuracy": 57.0, "final_epoch": 3, "oracle_best_test_accuracy": 57.0, "oracle_best_epoch": 3}},
        "final_epoch": 3, "final_test_accuracy": 61.0, "final_test_accuracy_std": pytest.approx(math.sqrt(32)),
        "oracle_best_test_accuracy": 63.5, "oracle_best_test_accuracy_std": pytest.approx(13 / math.sqrt(2))}
    assert summary["arms"]["oat"] == {
        "seeds": {"0": {"final_test_accuracy": 64.0, "final_epoch": 3, "oracle_best_test_accuracy": 66.0, "oracle_best_epoch": 2},
                  "1": {"final_test_accuracy": 70.0, "final_epoch": 3, "oracle_best_test_accuracy": 70.0, "oracle_best_epoch": 3}},
        "final_epoch": 3, "final_test_accuracy": 67.0, "final_test_accuracy_std": pytest.approx(6 / math.sqrt(2)),
        "oracle_best_test_accuracy": 68.0, "oracle_best_test_accuracy_std": pytest.approx(4 / math.sqrt(2))}
    # Another objective's arm: its own epochs only (the pre-training's 70 is not its best).
    assert summary["arms"]["ce_smooth"] == {
        "seeds": {"0": {"final_test_accuracy": 63.0, "final_epoch": 3, "oracle_best_test_accuracy": 63.0, "oracle_best_epoch": 3},
                  "1": {"final_test_accuracy": 61.0, "final_epoch": 3, "oracle_best_test_accuracy": 62.0, "oracle_best_epoch": 2}},
        "final_epoch": 3, "final_test_accuracy": 62.0, "final_test_accuracy_std": pytest.approx(math.sqrt(2)),
        "oracle_best_test_accuracy": 62.5, "oracle_best_test_accuracy_std": pytest.approx(1 / math.sqrt(2))}
    # One seed: the difference and whether it wins, no interval or test.
    one_seed = workdir.summarise([r for r in records if r["seed"] == 1], ["ce", "oat"], {"table": ""})
    assert one_seed["arms"]["oat"]["vs_ce"] == {"mean_difference": 13.0, "ci95": None, "p_value": None, "wins": 1,
                                                "seeds": 1, "select": "final"}
    one_seed = workdir.summarise([r for r in records if r["seed"] == 1], ["ce_smooth"], {"table": "Table 1"})
    assert one_seed == {"paper": {"table": "Table 1"}, "arms": {"ce_smooth": {
        "seeds": {"1": {"final_test_accuracy": 61.0, "final_epoch": 3, "oracle_best_test_accuracy": 62.0, "oracle_best_epoch": 2}},
        "final_epoch": 3, "final_test_accuracy": 61.0, "final_test_accuracy_std": 0.0, "oracle_best_test_accuracy": 62.0,
        "oracle_best_test_accuracy_std": 0.0, "oracle_best_epoch": 2}}}


def test_paired_comparison_matches_scipy_and_hand_computed_values():
    stats = pytest.importorskip("scipy.stats")
    arm = {"0": 89.1, "1": 88.7, "2": 89.6, "3": 88.9, "4": 89.4}
    reference = {"0": 88.8, "1": 88.9, "2": 89.0, "3": 88.5, "4": 88.9, "5": 70.0}  # seed 5 has no partner
    result = paired_comparison(arm, reference)
    differences = [0.3, -0.2, 0.6, 0.4, 0.5]  # by hand: mean 0.32, sample sd 0.3114...
    mean, sd = 0.32, math.sqrt(sum((d - 0.32) ** 2 for d in differences) / 4)
    test = stats.ttest_rel(list(arm.values()), [reference[s] for s in arm])  # an independent paired t-test
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert result == {"mean_difference": pytest.approx(mean), "wins": 4, "seeds": 5,
                      "p_value": pytest.approx(test.pvalue), "ci95": pytest.approx([mean - half, mean + half])}
    # By hand: t = 0.32 / (0.3114 / sqrt 5) = 2.298 on 4 degrees of freedom lies between the tables' 2.132
    # (two-sided p 0.10) and 2.776 (p 0.05).
    assert test.statistic == pytest.approx(2.298, abs=1e-3) and 0.05 < result["p_value"] < 0.10
    assert paired_comparison({"9": 1.0}, reference) is None
    same = paired_comparison({"0": 2.0, "1": 3.0}, {"0": 1.0, "1": 2.0})  # no spread: nothing to test against
    assert same == {"mean_difference": 1.0, "ci95": None, "p_value": None, "wins": 2, "seeds": 2, "no_spread": True}


def test_metrics_log_keeps_the_checkpointed_epochs_and_reads_up_to_a_cut_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = workdir.MetricsLog(path)
    for record in (_record("pretrain", 1, 0, 50.0), _record("ce", 2, 0, 60.0), _record("oat", 2, 0, 61.0),
                   _record("oat", 3, 0, 62.0)):
        log.append(record)
    log.keep_only({"pretrain": 1, "oat": 2})
    kept = [_record("pretrain", 1, 0, 50.0), _record("oat", 2, 0, 61.0)]
    assert log.records() == kept and workdir.read_records(path) == kept
    with open(path, "a") as f:
        f.write('{"arm": "oat", "epo')  # a line cut short by a kill
    assert workdir.read_records(path) == kept
    assert workdir.read_records(str(tmp_path / "none.jsonl")) == []


def test_the_workdir_module_and_the_plots_import_no_jax_and_no_report():
    code = ("import sys, oat_jax.workdir, oat_jax.plots; "
            "print(sorted(m for m in ('jax', 'oat_jax.report', 'oat_jax.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
