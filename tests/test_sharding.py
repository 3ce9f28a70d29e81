"""Data parallelism over several devices (4 and 8 CPU devices forced through XLA_FLAGS, in subprocesses):
the same accuracies (to one test sample) and, within float tolerance, the same parameters as one device,
since the anchor stays the centre of the global batch; and checkpoints saved across devices restore onto one."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from oat_jax import train
from oat_jax.checkpoints import ArmCheckpoints

TESTS = pathlib.Path(__file__).resolve().parent
SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import conftest  # registers the synthetic dataset
import jax
from oat_jax import train
from oat_jax.config_schema import base_config
config = base_config()
config.update(dict(dataset=conftest.SYNTHETIC, num_epochs=2, pretrain_epochs=1, batch_size=16, eval_batch_size=16,
                   learning_rate=0.01, progress=False, shuffle_eval=False))
config.update(json.loads(sys.argv[2]))
try:
    summary = train.train_and_evaluate(config, sys.argv[1], report=lambda record: None)
except Exception as error:
    print(json.dumps({{"error": f"{{type(error).__name__}}: {{error}}"}}))
    sys.exit(0)
print(json.dumps({{"devices": jax.device_count(), "summary": summary}}))
"""


def _run(workdir, devices, **overrides):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS)), str(workdir),
                             json.dumps(overrides)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _final_params(workdir):
    template = train.create_replicas(train.cached_model("lightweight", 4), (16, 16, 1),
                                     _config_like_the_script())
    manager = ArmCheckpoints(str(workdir), "oat")
    state = manager.restore(manager.latest_epoch(), template)  # saved across devices, restored onto one
    manager.close()
    return jax.device_get(state.params)


def _config_like_the_script():
    from conftest import SYNTHETIC
    from oat_jax.config_schema import base_config
    config = base_config()
    config.update(dict(dataset=SYNTHETIC, learning_rate=0.01))
    return config


def test_several_devices_train_what_one_device_trains(tmp_path):
    one = _run(tmp_path / "one", 1)
    assert one["devices"] == 1
    reference = jax.tree.leaves(_final_params(tmp_path / "one"))
    for devices in (4, 8):
        many = _run(tmp_path / str(devices), devices)
        assert many["devices"] == devices
        for arm in ("ce", "oat"):
            assert many["summary"]["arms"][arm]["final_test_accuracy"] == pytest.approx(
                one["summary"]["arms"][arm]["final_test_accuracy"], abs=100 / 75 + 1e-9)  # one test sample at most
        for a, b in zip(reference, jax.tree.leaves(_final_params(tmp_path / str(devices)))):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path):
    result = _run(tmp_path / "run", 4, batch_size=10)
    assert result["error"].startswith("ShardingError: batch_size 10 does not divide over the 4 devices")
    assert not (tmp_path / "run").exists()
