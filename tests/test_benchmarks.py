"""The benchmark commands run, and emit the figures the README table is built from (not their speed)."""
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import readme_table
from conftest import cpu_devices_environment

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(module, *args, env=None, check=True):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def test_epoch_time_lists_a_dataset_it_cannot_find_as_skipped(tmp_path):
    # What it measures is checked on the GPU check's dry run, which times Fashion-MNIST's epochs through it.
    missing = tmp_path / "nothing_here"
    missing.mkdir()
    printed = json.loads(_run("benchmarks.epoch_time", "--datasets", "cifar10", "--train-limit", "32",
                              env=dict(os.environ, OAT_DATA_DIR=str(missing))).stdout)
    if "cifar10" in printed["datasets"]:
        pytest.skip("CIFAR-10 is installed on this machine: there is nothing to skip")
    assert printed["datasets"] == {} and "CIFAR-10" in printed["skipped"]["cifar10"]


def test_readme_performance_section_matches_the_result_files():
    # The tables live in benchmarks/README.md; the project README links there instead of holding them.
    assert os.path.samefile(readme_table.README, ROOT / "benchmarks" / "README.md")
    assert readme_table.START in (ROOT / "benchmarks" / "README.md").read_text()
    assert readme_table.START not in (ROOT / "README.md").read_text()
    result = subprocess.run([sys.executable, "-m", "benchmarks.readme_table", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_scaling_times_each_arm_on_each_device_count(tmp_path):
    env = cpu_devices_environment(2)
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


def test_step_time_reports_both_arms_and_says_once_when_torch_is_missing_and_torch_alone_says_why(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "torch.py").write_text("raise ImportError('torch is hidden from this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "step.json"
    done = _run("benchmarks.step_time", "--quick", "--image-shape", "20,20,2", "--seeds", "2", "--out", str(out),
                env=env)
    printed = json.loads(done.stdout)
    assert json.loads(out.read_text()) == printed
    setup = printed["setup"]
    assert setup["quick"] and (setup["steps"], setup["repeats"], setup["seeds"]) == (10, 2, [2])  # --seeds wins
    for table in ("train_ms", "eval_ms"):
        for arm in ("ce", "oat"):
            stats = printed["jax"][table][arm]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"] and stats["repeats"] == 2
    assert list(printed["jax"]["seeds"]) == ["2"]
    assert printed["ratios"]["oat_over_ce_train"] == pytest.approx(
        printed["jax"]["train_ms"]["oat"]["median"] / printed["jax"]["train_ms"]["ce"]["median"])
    environment = printed["environment"]
    assert environment["platform"] == "cpu" and environment["jax_version"] and not environment["tensorflow_imported"]
    assert printed["peak_rss_mb"] > 0
    assert setup["torch_skipped"] == "torch is not installed" and "torch" not in printed
    notes = [line for line in done.stderr.splitlines() if "comparison is skipped" in line]
    assert notes == ["note: the JAX/PyTorch comparison is skipped: torch is not installed (to get it: pip install "
                     "torch, or the project's extra: pip install -e '.[torch]')"]

    done = _run("benchmarks.torch_reference", env=env, check=False)  # PyTorch alone: an error, in one line
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: this benchmark times PyTorch, which is not installed (to get it: pip install torch, or the "
        "project's extra: pip install -e '.[torch]')"]


def test_torch_runs_on_the_cpu_beside_jax_on_the_cpu():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_reference
    assert torch_reference.resolve_device("auto", "cpu") == "cpu"
    assert torch_reference.resolve_device("auto", "gpu") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown torch device"):
        torch_reference.resolve_device("tpu")
