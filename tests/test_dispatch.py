"""Long runs on several forced CPU devices, and devices that stop answering (oat_jax.dispatch).

With every step dispatched at once, XLA:CPU deadlocked after a few hundred steps on 2 or 4 devices and
aborted the process 40 s later; the first test is that run on 4 devices (the CLI on 4,000 real Fashion-MNIST
images, 625 steps in all). The second makes one step never finish and checks that the watchdog ends the run in
one line, before XLA would, and that the rerun resumes to the uninterrupted run's results."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import cpu_devices_environment
from oat_jax import dispatch
from oat_jax.data import fashion_mnist

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_DIR) and not os.environ.get("OAT_DATA_DIR"),
                    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_hundreds_of_steps_on_four_devices_finish_and_learn(tmp_path):
    # That a run on several devices gives what one device gives is test_sharding's (8 devices against 1).
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "oat_jax.main", "--config", str(ROOT / "configs/fashion_mnist_lightweight.py"),
         "--workdir", str(workdir), "--config.train_limit=4000", "--config.test_limit=500",
         "--config.num_epochs=3", "--config.pretrain_epochs=1", "--config.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=cpu_devices_environment(4))
    assert result.returncode == 0, result.stderr[-3000:]
    arms = json.loads((workdir / "summary.json").read_text())["arms"]
    for arm in ("ce", "oat"):
        assert arms[arm]["final_epoch"] == 3 and arms[arm]["final_test_accuracy"] > 25.0, arms  # chance: 10 %


def _sharded_run(workdir, overrides, *extra):
    return subprocess.run([sys.executable, str(TESTS / "sharded_run.py"), str(workdir), json.dumps(overrides),
                           *extra], capture_output=True, text=True, timeout=600, env=cpu_devices_environment(2))


def test_a_stalled_device_ends_the_run_in_one_line_and_the_rerun_resumes(tmp_path):
    # 13 steps an epoch: step 20 is the 7th of the cross-entropy arm's epoch 2, after pre-training's epoch 1.
    stalled = _sharded_run(tmp_path / "run", {"stall_timeout_seconds": 3}, "stall:20")
    assert stalled.returncode == dispatch.STALL_EXIT_CODE, stalled.stderr[-3000:]
    assert "Traceback" not in stalled.stderr and "Fatal" not in stalled.stderr
    last = stalled.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training of arm 'ce', epoch 2, step 7 of 13 has waited over 3 s for its 2 "
                           "devices and is stalled;"), last
    assert "--config.steps_in_flight" in last and last.endswith("rerun the same command to resume from the last "
                                                                "finished epoch")
    assert (tmp_path / "run/checkpoints/pretrain/13").is_dir()  # the last finished epoch (optimiser step 13) is kept

    # The rerun resumes from there (that it then matches an uninterrupted run exactly is test_train's and
    # test_cli's resume tests): both arms finish, and every epoch is logged once.
    resumed = _sharded_run(tmp_path / "run", {"stall_timeout_seconds": 3})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    arms = json.loads(resumed.stdout.splitlines()[-1])["summary"]["arms"]
    assert {arm: result["final_epoch"] for arm, result in arms.items()} == {"ce": 2, "oat": 2}
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["epoch"]) for r in logged] == [("pretrain", 1), ("ce", 2), ("oat", 2)]
