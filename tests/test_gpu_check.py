"""python -m benchmarks.gpu_check: its dry run (the GPU sequence on the CPU at toy sizes) and what it records,
a failing or stalled part that leaves the others running, and the README rows of its file."""
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_check, readme_table
from oat_jax.data import fashion_mnist

ROOT = pathlib.Path(__file__).resolve().parent.parent
PARTS = [part.name for part in gpu_check.plan(True, "")]
pytestmark = pytest.mark.xdist_group("gpu_check_dry_run")  # one dry run (2 minutes), one worker


def _fashion_mnist_found() -> bool:
    folders = [os.environ.get("OAT_DATA_DIR", ""), fashion_mnist.DEFAULT_DIR]
    return any(folder and not fashion_mnist.find_files(folder)[1] for folder in folders)


def _check(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory):
    """One dry run for the module: (the finished process, the JSON it wrote)."""
    if not _fashion_mnist_found():
        pytest.skip("real Fashion-MNIST not installed (the epoch, CLI and PyTorch parts read it)")
    # Its PyTorch parts fail without torch, as on a GPU machine; .ci/run installs it, make install does not.
    pytest.importorskip("torch", reason="the dry run times the PyTorch loop too: pip install torch")
    out = tmp_path_factory.mktemp("gpu_check") / "dry_run.json"
    done = _check("--dry-run", "--out", str(out))
    assert out.exists(), done.stdout + done.stderr[-3000:]
    return done, json.loads(out.read_text())


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        yield from _numbers(item)


def test_dry_run_passes_every_part_in_order(dry_run):
    done, result = dry_run
    assert done.returncode == 0, json.dumps({n: r.get("error") for n, r in result["parts"].items()}, indent=1)
    assert result["benchmark"] == "gpu_check" and result["dry_run"] and result["passed"] and result["failed"] == []
    assert list(result["parts"]) == PARTS
    for name, record in result["parts"].items():
        assert record["status"] == "passed" and record["returncode"] == 0, (name, record.get("error"))
        assert 0 < record["seconds"] <= record["timeout_s"] and record["cpu_s"] > 0
    progress = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == len(PARTS) + 1  # the environment, then each part: one line with its seconds
    assert all(" passed in " in line and line.rstrip().endswith("s of CPU)") for line in progress)
    assert "README" not in done.stdout  # a dry run writing elsewhere leaves the README alone


def test_dry_run_figures_are_positive_and_finite(dry_run):
    _, result = dry_run
    parts = {name: record["result"] for name, record in result["parts"].items()}
    for name, figures in parts.items():
        assert all(math.isfinite(v) for v in _numbers(figures)), name
    for name in ("step_lightweight", "step_wrn28_10_b32", "step_wrn28_10_b128"):
        for table in ("train_ms", "eval_ms"):
            assert all(parts[name]["jax"][table][arm]["median"] > 0 for arm in ("ce", "oat"))
    assert parts["step_wrn28_10_b32"]["setup"]["model"] == "wrn28_10"  # the registry's model, made small
    light = parts["step_lightweight"]
    assert light["torch"]["train_ms"]["oat"]["median"] > 0 and light["ratios"]["jax_over_torch_train_ce"] == \
        pytest.approx(light["jax"]["train_ms"]["ce"]["median"] / light["torch"]["train_ms"]["ce"]["median"])
    arms = parts["epoch_fashion_mnist"]["datasets"]["fashion_mnist"]["arms"]
    assert {"ce", "oat", "ce_fused", "oat_fused"} <= set(arms)
    assert all(arm["steady_epoch_s"]["median"] > 0 for arm in arms.values())
    seeds = parts["replicas"]["jax"]["seeds"]
    assert len(seeds) >= 2 and all(figures["per_seed_ms"] > 0 for figures in seeds.values())
    cli = parts["cli"]
    assert cli["reported_wall_s"] > 0 and set(cli["test_accuracy"]) == {"ce", "oat"}
    assert all(0 <= accuracy <= 100 for accuracy in cli["test_accuracy"].values())
    assert cli["summary"]["dataset"]["train_samples"] == 64 and cli["epochs"]
    assert any(line.startswith("OAT") for line in cli["printed"])
    torch = parts["torch_cuda"]
    assert torch["torch"]["device"] == "cpu" and torch["epochs"]["arms"]["oat"]["steady_epoch_s"]["median"] > 0


def test_dry_run_epoch_part_measures_every_decoding(dry_run):
    _, result = dry_run
    printed = result["parts"]["epoch_fashion_mnist"]["result"]
    setup, env = printed["setup"], printed["environment"]
    assert (setup["epochs"], setup["train_limit"], setup["batch_size"], setup["eval_batch_size"]) == (2, 64, 32, 32)
    assert "python -m benchmarks.epoch_time --datasets fashion_mnist --epochs 2 --train-limit 64" in printed["command"]
    assert len(env["load_average_start"]) == len(env["load_average_end"]) == 3
    figures = printed["datasets"]["fashion_mnist"]
    assert figures["train_samples"] == 64 and figures["test_samples"] == 64 and figures["steps_per_epoch"] == 2
    arms, ratios, evals = figures["arms"], figures["ratios"], figures["evaluation"]
    assert set(arms) == {"ce", "oat", "ce_fused", "oat_fused", "torch_ce", "torch_oat"} and setup["torch"]
    for name, arm in arms.items():
        assert arm["decode"] == ("uniform" if arm["objective"] == "ce" else "batch")
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
        expected[f"jax_over_torch_epoch_{objective}"] = quotient(objective, f"torch_{objective}")
        expected[f"fused_over_stepwise_epoch_{objective}"] = quotient(f"{objective}_fused", objective)
    assert ratios == pytest.approx(expected) and set(ratios) == set(expected)
    for name, spread in figures["paired_ratios"].items():
        assert spread["min"] <= spread["median"] <= spread["max"]
    assert set(evals["eval_s"]) == {"ce", "oat", "oat_class_anchors"}
    for stats in [*evals["eval_s"].values(), evals["class_anchor_precompute_s"]]:
        assert 0 < stats["min"] <= stats["median"] <= stats["max"] and stats["repeats"] == 1
    assert set(evals["test_accuracy"]) == {"ce", "oat", "oat_class_anchors"}
    assert all(0 <= accuracy <= 100 for accuracy in evals["test_accuracy"].values())
    assert evals["test_accuracy"]["oat"] == pytest.approx(arms["oat"]["final_test_accuracy"])


def test_dry_run_records_environment_and_commands(dry_run):
    _, result = dry_run
    env = result["environment"]
    assert env["jax"]["backend"] == "cpu" and env["jax"]["version"] and env["jax"]["device_count"] >= 1
    assert env["jax"]["device_kind"] and env["device"] and env["python"] and env["date"]
    assert env["packages"]["jax"] == env["jax"]["version"] and env["missing_modules"] == []
    assert env["fashion_mnist"]
    if env["torch"] is not None:
        assert env["torch"]["version"] and env["torch"]["cuda_available"] in (True, False)
    assert result["environment_probe"]["status"] == "passed"
    assert result["command"].startswith("python -m benchmarks.gpu_check --dry-run --out ")
    modules = {"step_lightweight": "benchmarks.step_time", "step_wrn28_10_b128": "benchmarks.step_time",
               "epoch_fashion_mnist": "benchmarks.epoch_time", "replicas": "benchmarks.step_time",
               "cli": "oat_jax.main --config configs/default.py", "torch_cuda": "benchmarks.torch_reference"}
    for name, module in modules.items():
        command = result["parts"][name]["command"]
        assert "JAX_PLATFORMS=cpu" in command and f"python -m {module}" in command, command
        assert "<scratch>" in command and "oat_gpu_check_" not in command  # no temporary path left
    assert "--config.fused_epoch=True" in result["parts"]["cli"]["command"]
    assert "--batch-size 2" in result["parts"]["step_wrn28_10_b128"]["command"]


def _fake_part(name, scratch, code):
    """A part of a few milliseconds: ``code`` run by python -c, which fails when given the breaking option."""
    out = os.path.join(scratch, f"{name}.json")
    guard = "import json, sys; sys.exit(2) if '--no-such-option' in sys.argv else None; "
    return gpu_check.Part(name, f"fake {name}", ["-c", guard + code, out], 30, out)


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def plan(dry_run, scratch):
        return [_fake_part("first", scratch, "json.dump({'ms': 1.5}, open(sys.argv[1], 'w'))"),
                _fake_part("second", scratch, "json.dump({'ms': 2.5}, open(sys.argv[1], 'w'))"),
                _fake_part("third", scratch, "json.dump({'ms': float('nan')}, open(sys.argv[1], 'w'))")]

    monkeypatch.setattr(gpu_check, "plan", plan)
    monkeypatch.setattr(gpu_check, "_probe_part", lambda dry_run: gpu_check.Part(
        "environment", "fake probe", ["-c", "print('{\"jax\": {\"device_kind\": \"Fake GPU\"}}')"], 30,
        collect=json.loads))
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--break-part", "first", "--out", str(tmp_path / "out.json")])
    assert gpu_check.check(gpu_check._parse()) == 1  # not all passed
    result = json.loads((tmp_path / "out.json").read_text())
    assert list(result["parts"]) == ["first", "second", "third"] and result["failed"] == ["first", "third"]
    first, second, third = result["parts"].values()
    assert first["status"] == "failed" and first["returncode"] == 2 and "exit status 2" in first["error"]
    assert first["command"].endswith("--no-such-option")  # the test-only hook that breaks a part
    assert second["status"] == "passed" and second["result"] == {"ms": 2.5}  # it ran after the failure
    assert third["status"] == "failed" and "result.ms is nan" in third["error"]  # a figure that is no number
    assert result["environment"] == {"jax": {"device_kind": "Fake GPU"}} and not result["passed"]
    progress = capsys.readouterr().out.splitlines()
    assert progress[2].startswith("[1/3] first: failed in ") and progress[3].startswith("[2/3] second: passed in ")


def test_only_the_parts_asked_for(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--dry-run", "--parts", "cli,replicas"])
    assert gpu_check._parse().parts == ["cli", "replicas"]
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--parts", "nonsense"])
    with pytest.raises(SystemExit):
        gpu_check._parse()


def test_a_stalled_part_is_ended_with_its_children(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_PART_S", 0)
    pid_file = tmp_path / "child.pid"
    stall = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(60)")
    part = gpu_check.Part("stall", "sleeps", ["-c", stall, str(pid_file)], timeout_s=3)
    started = time.perf_counter()
    record = gpu_check.run_part(part, {}, str(tmp_path), budget_left_s=100)
    assert record["status"] == "timed_out" and record["returncode"] is None and "within 3 s" in record["error"]
    assert time.perf_counter() - started < 30
    child = int(pid_file.read_text())
    time.sleep(0.5)
    try:
        with open(f"/proc/{child}/status") as f:
            assert "zombie" in f.read()  # killed, not yet reaped by init
    except FileNotFoundError:
        pass  # killed and reaped

    failing = gpu_check.Part("fails", "exits 3", ["-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], 30)
    record = gpu_check.run_part(failing, {}, str(tmp_path), budget_left_s=100)
    assert record["status"] == "failed" and record["returncode"] == 3 and "boom" in record["error"]

    monkeypatch.setattr(gpu_check, "MIN_PART_S", 15)
    record = gpu_check.run_part(failing, {}, str(tmp_path), budget_left_s=10)
    assert record["status"] == "skipped" and "budget" in record["error"]


def test_device_slug_names_the_file():
    assert gpu_check.slug("NVIDIA H200") == "nvidia_h200" and gpu_check.slug("cpu") == "cpu"


# The README rows of a gpu_check file, from a small synthetic one.

def _stats(median):
    return {"median": median, "min": median * 0.9, "max": median * 1.1, "repeats": 3}


def _step(model, batch, train, torch=None):
    result = {"setup": {"model": model, "image_shape": [32, 32, 3], "batch_size": batch},
              "jax": {"train_ms": {"ce": _stats(train), "oat": _stats(train * 1.1)},
                      "eval_ms": {"ce": _stats(1.0), "oat": _stats(1.2)}, "seeds": {}},
              "ratios": {"oat_over_ce_train": 1.1, "oat_over_ce_eval": 1.2}}
    if torch:
        result["torch"] = {"train_ms": {"ce": _stats(torch), "oat": _stats(torch)}}
        result["ratios"].update(jax_over_torch_train_ce=train / torch, jax_over_torch_train_oat=train * 1.1 / torch)
    return result


def _epoch_arm(epoch_s, train_s):
    return {"steady_epoch_s": _stats(epoch_s), "steady_train_s": _stats(train_s)}


def _synthetic_check():
    arms = {"ce": _epoch_arm(2.0, 1.5), "oat": _epoch_arm(2.2, 1.6), "ce_fused": _epoch_arm(0.5, 0.4),
            "oat_fused": _epoch_arm(0.6, 0.5), "torch_ce": _epoch_arm(4.0, 3.0), "torch_oat": _epoch_arm(4.4, 3.2)}
    results = {
        "step_lightweight": _step("lightweight", 32, 2.0, torch=4.0),
        "step_wrn28_10_b32": _step("wrn28_10", 32, 20.0),
        "step_wrn28_10_b128": None,
        "epoch_fashion_mnist": {"setup": {"torch_device": "cuda"},
                                "datasets": {"fashion_mnist": {"train_samples": 60000, "test_samples": 10000,
                                                               "arms": arms}}},
        "replicas": {"setup": {"model": "lightweight", "image_shape": [32, 32, 3], "batch_size": 32},
                     "jax": {"seeds": {str(k): {"train_ms": _stats(k * 1.0), "per_seed_ms": 1.0,
                                                "per_seed_samples_per_s": 32000.0} for k in (1, 4, 8)}}},
        "cli": {"summary": {"dataset": {"train_samples": 60000, "test_samples": 10000}},
                "test_accuracy": {"ce": 80.0, "oat": 81.5}},
        "torch_cuda": {"torch": {"device": "cuda"},
                       "epochs": {"dataset": "fashion_mnist", "train_samples": 60000, "test_samples": 10000,
                                  "arms": {"ce": _epoch_arm(3.0, 2.4), "oat": _epoch_arm(3.3, 2.5)}}},
    }
    parts = {name: {"status": "passed", "seconds": 30.0, "result": figures} if figures else
             {"status": "timed_out", "seconds": 180.0} for name, figures in results.items()}
    return {"benchmark": "gpu_check", "dry_run": False, "seconds": 400.0, "parts": parts,
            "failed": ["step_wrn28_10_b128"], "passed": False,
            "environment": {"device": "NVIDIA H200", "date": "2026-12-02 10:00 UTC",
                            "packages": {"jax": "0.11.2", "torch": "2.11.0"}}}


def test_readme_renders_a_gpu_check_file(tmp_path):
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    before = readme_table.render(str(tmp_path))
    (tmp_path / "gpu_check_nvidia_h200.json").write_text(json.dumps(_synthetic_check()))
    after = readme_table.render(str(tmp_path))
    assert after.startswith(before[:-len(readme_table.END)])  # the CPU tables unchanged, the GPU ones after
    rows = [line for line in after.splitlines() if line.startswith("| `gpu_check_nvidia_h200.json`")]
    where = "| `gpu_check_nvidia_h200.json` | NVIDIA H200 | 2026-12-02 10:00 UTC |"
    assert f"{where} 0.11.2 / 2.11.0 | 6 of 7 (step_wrn28_10_b128 not) | 400 | 30.0 | 60000 / 10000 | " \
           "80.00 / 81.50 |" in rows
    epoch = f"{where} fashion_mnist (60000 / 10000) |"
    assert (f"{epoch} JAX, step by step | 2.00 (1.80–2.20) | 2.20 (1.98–2.42) | 1.100 | 40000 / 37500 | "
            "0.50 / 0.50 |") in rows
    assert (f"{epoch} JAX, fused | 0.50 (0.45–0.55) | 0.60 (0.54–0.66) | 1.200 | 150000 / 120000 | "
            "0.12 / 0.14 |") in rows
    assert any(row.startswith(f"{epoch} PyTorch (cuda), eager, same process | 4.00 ") for row in rows)
    assert any(row.startswith(f"{epoch} PyTorch (cuda), eager, alone | 3.00 ") and row.endswith("| – |")
               for row in rows)
    assert (f"{where} lightweight, 32×32×3, batch 32 | 2.00 (1.80–2.20) | 2.20 (1.98–2.42) | 1.100 | "
            "1.00 (0.90–1.10) | 1.20 (1.08–1.32) | 4.00 (3.60–4.40) | 4.00 (3.60–4.40) | 0.50 / 0.55 | "
            "16000 / 14545 |") in rows
    assert any(row.startswith(f"{where} wrn28_10, 32×32×3, batch 32 | 20.00 ") and "| – | – | – |" in row
               for row in rows)
    assert not any("batch 128" in row for row in rows)  # the part that timed out has no row
    assert [row.split(" | ")[4] for row in rows if "| 32000 |" in row] == ["1", "4", "8"]
