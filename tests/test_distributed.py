"""Joining a run over several processes: where the settings come from, the mistakes refused in one line,
and a process whose partners never come. The run itself is tested in test_sharding.py."""
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from oat_jax import distributed
from oat_jax.config_schema import ConfigError, base_config, validate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(**fields):
    config = base_config()
    config.distributed.update(fields)
    return config


@pytest.fixture
def no_environment(monkeypatch):
    for name in distributed.ENVIRONMENT.values():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_by_default(no_environment):
    assert distributed.settings(_config()) is None


def test_settings_from_the_config(no_environment):
    assert distributed.settings(_config(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}


def test_settings_from_the_environment_and_the_config_wins(no_environment):
    no_environment.setenv("OAT_COORDINATOR_ADDRESS", "host-a:9000")
    no_environment.setenv("OAT_NUM_PROCESSES", "2")
    no_environment.setenv("OAT_PROCESS_ID", "1")
    assert distributed.settings(_config()) == {"coordinator_address": "host-a:9000", "num_processes": 2,
                                               "process_id": 1}
    assert distributed.settings(_config(process_id=0, coordinator_address="host-b:9001")) == {
        "coordinator_address": "host-b:9001", "num_processes": 2, "process_id": 0}


def test_auto_leaves_everything_to_jax_cluster_detection(no_environment):
    assert distributed.settings(_config(coordinator_address="auto")) == {}


@pytest.mark.parametrize("fields, environment, message", [
    ({"num_processes": 2, "process_id": 1}, {}, "need a coordinator"),
    ({"coordinator_address": "10.0.0.1"}, {}, "must be host:port, got '10.0.0.1'"),
    ({"coordinator_address": "10.0.0.1:1234"}, {}, "set num_processes"),
    ({"coordinator_address": "10.0.0.1:1234", "num_processes": 2}, {}, r"process_id \(0..num_processes-1, got -1\)"),
    ({"coordinator_address": "10.0.0.1:1234", "process_id": 0}, {"OAT_NUM_PROCESSES": "two"},
     r"\$OAT_NUM_PROCESSES must be a whole number, got 'two'"),
])
def test_incomplete_settings_are_named(no_environment, fields, environment, message):
    for name, value in environment.items():
        no_environment.setenv(name, value)
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.settings(_config(**fields))


@pytest.mark.parametrize("fields, message", [
    ({"num_processes": -1}, "distributed.num_processes must be non-negative"),
    ({"process_id": -2}, "distributed.process_id must be -1"),
    ({"num_processes": 2, "process_id": 2}, "distributed.process_id 2 is not below num_processes 2"),
    ({"timeout_seconds": 0}, "distributed.timeout_seconds must be at least 1"),
])
def test_impossible_distributed_values_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_config(**fields))


def test_an_unknown_anchor_scope_is_refused():
    config = base_config()
    config.anchor_scope = "host"
    with pytest.raises(ConfigError, match="anchor_scope must be one of global, device, got 'host'"):
        validate_config(config)


def test_a_process_whose_partners_never_come_stops_with_one_line(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", OAT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", OAT_NUM_PROCESSES="2",
               OAT_PROCESS_ID="0")
    result = subprocess.run([sys.executable, "-m", "oat_jax.main", "--config", str(ROOT / "configs" / "default.py"),
                             "--workdir", str(tmp_path / "run"), "--config.distributed.timeout_seconds=3"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == (f"error: cannot join the run as process 0 of 2 with coordinator 127.0.0.1:{port}: not every "
                         "process joined within 3 s (distributed.timeout_seconds); start all of them with the same "
                         "coordinator address")
    assert "Traceback" not in result.stderr and "Check failure" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written before every process has joined
