"""The benchmark commands run, and emit the figures the README table is built from (not their speed)."""
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(module, *args, env=None):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_step_time_reports_both_arms_and_ratios(tmp_path):
    out = tmp_path / "step.json"
    printed = json.loads(_run("benchmarks.step_time", "--steps", "3", "--repeats", "2", "--image-shape", "20,20,2",
                              "--seeds", "2", "--out", str(out)).stdout)
    assert json.loads(out.read_text()) == printed
    for table in ("train_ms", "eval_ms"):
        for arm in ("ce", "oat"):
            stats = printed["jax"][table][arm]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"] and stats["repeats"] == 2
    ratios = printed["ratios"]
    assert ratios["oat_over_ce_train"] == pytest.approx(
        printed["jax"]["train_ms"]["oat"]["median"] / printed["jax"]["train_ms"]["ce"]["median"])
    if "torch" in printed:
        assert ratios["jax_over_torch_train_ce"] > 0
    env = printed["environment"]
    assert env["platform"] == "cpu" and env["jax_version"] and not env["tensorflow_imported"]
    assert printed["peak_rss_mb"] > 0


def test_epoch_time_measures_every_decoding(tmp_path):
    out = tmp_path / "epoch.json"
    printed = json.loads(_run("benchmarks.epoch_time", "--train-limit", "96", "--test-limit", "330", "--epochs", "2",
                              "--eval-repeats", "2", "--no-fused", "--datasets", "fashion_mnist,cifar10", "--out",
                              str(out)).stdout)  # the fused epoch's path is tested in test_train and test_sharding
    assert json.loads(out.read_text()) == printed
    # CIFAR-10 is not on this machine unless placed there; it must then be skipped with the reason.
    assert "cifar10" in printed["datasets"] or "CIFAR-10" in printed["skipped"]["cifar10"]
    if "fashion_mnist" in printed["skipped"]:
        pytest.skip("real Fashion-MNIST not installed")
    setup, env = printed["setup"], printed["environment"]
    assert (setup["epochs"], setup["train_limit"], setup["batch_size"], setup["eval_batch_size"]) == (2, 96, 32, 32)
    assert "python -m benchmarks.epoch_time --train-limit 96" in printed["command"]
    assert len(env["load_average_start"]) == len(env["load_average_end"]) == 3
    figures = printed["datasets"]["fashion_mnist"]
    assert figures["train_samples"] == 96 and figures["test_samples"] == 330 and figures["steps_per_epoch"] == 3
    arms, ratios, evals = figures["arms"], figures["ratios"], figures["evaluation"]
    torch = setup["torch"]
    assert set(arms) == {"ce", "oat"} | ({"torch_ce", "torch_oat"} if torch else set())
    for name, arm in arms.items():
        assert arm["decode"] == ("argmax" if arm["objective"] == "ce" else "anchor")
        assert len(arm["epoch_s"]) == len(arm["train_s"]) == len(arm["eval_s"]) == 2
        assert arm["epoch_s"] == pytest.approx([t + e for t, e in zip(arm["train_s"], arm["eval_s"])], abs=1e-3)
        assert arm["first_epoch_s"] == arm["epoch_s"][0]
        steady = arm["steady_epoch_s"]
        assert 0 < steady["min"] <= steady["median"] <= steady["max"] and steady["repeats"] == 1
        assert all(0 <= accuracy <= 100 for accuracy in arm["test_accuracy"])
        if arm["framework"] == "jax":
            # The first epoch compiles the steps (or finds them compiled by an earlier arm); later ones do not.
            assert 0 <= arm["first_epoch_compile_s"] <= arm["first_epoch_s"]
            assert arm["steady_compile_s"]["max"] < 0.1
    assert arms["ce"]["first_epoch_compile_s"] > 0  # the first arm compiles its training and evaluation steps

    def quotient(numerator, denominator):
        return arms[numerator]["steady_epoch_s"]["median"] / arms[denominator]["steady_epoch_s"]["median"]

    expected = {"oat_over_ce_epoch": quotient("oat", "ce"),
                "oat_over_ce_eval": evals["eval_s"]["oat"]["median"] / evals["eval_s"]["ce"]["median"],
                "class_anchors_over_batch_anchor_eval":
                    evals["eval_s"]["oat_class_anchors"]["median"] / evals["eval_s"]["oat"]["median"]}
    for objective in ("ce", "oat"):
        arm = arms[objective]
        expected[f"first_over_steady_{objective}"] = ((arm["first_epoch_s"] - arm["first_epoch_compile_s"])
                                                      / arm["steady_epoch_s"]["median"])
        if torch:
            expected[f"jax_over_torch_epoch_{objective}"] = quotient(objective, f"torch_{objective}")
    assert ratios == pytest.approx(expected) and set(ratios) == set(expected)
    for name, spread in figures["paired_ratios"].items():
        assert spread["min"] <= spread["median"] <= spread["max"]
    assert set(evals["eval_s"]) == {"ce", "oat", "oat_class_anchors"}
    for stats in [*evals["eval_s"].values(), evals["class_anchor_precompute_s"]]:
        assert 0 < stats["min"] <= stats["median"] <= stats["max"] and stats["repeats"] == 2
    assert set(evals["test_accuracy"]) == {"ce", "oat", "oat_class_anchors"}
    assert all(0 <= accuracy <= 100 for accuracy in evals["test_accuracy"].values())
    assert evals["test_accuracy"]["oat"] == pytest.approx(arms["oat"]["final_test_accuracy"])


def test_readme_performance_section_matches_the_result_files():
    result = subprocess.run([sys.executable, "-m", "benchmarks.readme_table", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_scaling_times_each_arm_on_each_device_count(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    printed = json.loads(_run("benchmarks.scaling", "--steps", "2", "--repeats", "2", "--image-shape", "16,16,1",
                              "--per-device-batch", "4", env=env).stdout)
    assert printed["setup"]["devices"] == [1, 2] and printed["environment"]["device_count"] == 2
    one, two = printed["by_devices"]["1"], printed["by_devices"]["2"]
    assert (one["global_batch"], two["global_batch"]) == (4, 8)
    for name in ("ce", "oat", "oat_device_anchor"):
        assert one["efficiency"][name] == 1.0
        assert two["samples_per_s"][name] == pytest.approx(1e3 * 8 / two["train_ms"][name]["median"])
        assert two["efficiency"][name] == pytest.approx(two["samples_per_s"][name] / (2 * one["samples_per_s"][name]))
    assert two["oat_over_ce"] == pytest.approx(two["train_ms"]["oat"]["median"] / two["train_ms"]["ce"]["median"])


def test_scaling_refuses_more_devices_than_there_are():
    result = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--devices", "1,3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2
    assert "--devices must lie in 1..1 (the devices JAX sees), got [1, 3]" in result.stderr


@pytest.mark.parametrize("module, expected", [
    ("step_time", ["a model name of oat_jax.models (default: lightweight)", "(default: 100; 10 with --quick)",
                   "(default: 5; 2 with --quick)", "(default: 1,4,8; 1,4 with --quick)", "(default: auto)"]),
    ("epoch_time", ["(default: fashion_mnist,cifar10)", "(default: 3)", "(default: auto)"]),
    ("scaling", ["(default: 300)", "(default: 32,32,3, CIFAR-10's)", "(default: 2)"]),
])
def test_help_shows_the_defaults(module, expected, monkeypatch, capsys):
    parse = importlib.import_module(f"benchmarks.{module}")._parse
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as stopped:
        parse()
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for default in expected:
        assert default in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_step_time_quick_without_torch_says_so_once(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "torch.py").write_text("raise ImportError('torch is hidden from this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")])))
    done = _run("benchmarks.step_time", "--quick", "--image-shape", "20,20,2", "--seeds", "2",
                env=env)
    printed = json.loads(done.stdout)
    setup = printed["setup"]
    assert setup["quick"] and (setup["steps"], setup["repeats"], setup["seeds"]) == (10, 2, [2])  # --seeds wins
    assert printed["jax"]["train_ms"]["oat"]["repeats"] == 2 and list(printed["jax"]["seeds"]) == ["2"]
    assert setup["torch_skipped"] == "torch is not installed" and "torch" not in printed
    notes = [line for line in done.stderr.splitlines() if "comparison is skipped" in line]
    assert notes == ["note: the JAX/PyTorch comparison is skipped: torch is not installed (to get it: pip install "
                     "torch, or the project's extra: pip install -e '.[torch]')"]


def test_torch_runs_on_the_cpu_beside_jax_on_the_cpu():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference
    assert torch_reference.resolve_device("auto", "cpu") == "cpu"
    assert torch_reference.resolve_device("auto", "gpu") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown torch device"):
        torch_reference.resolve_device("tpu")
