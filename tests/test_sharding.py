"""Data parallelism over several devices (4 and 8 CPU devices forced through XLA_FLAGS, in subprocesses) and
over two processes of two devices joined through jax.distributed on loopback. Against one device (this
process): the same accuracies to one test sample and the same parameters and BatchNorm statistics within
float tolerance, since the anchor stays the centre of the global batch; the same evaluation with padded and
unsplittable test batches; the fused epoch too. The per-device anchor option; and checkpoints saved across
devices or processes, restored onto one device."""
import functools
import subprocess

import jax
import numpy as np
import pytest

import sharded_run
from conftest import cpu_devices_environment, run_two_processes, sharded_run_command, sharded_run_result
from oat_jax import sharding
from oat_jax.checkpoints import ArmCheckpoints
from oat_jax.experiment import Experiment



def _run(workdir, devices, **overrides):
    result = subprocess.run(sharded_run_command(workdir, overrides), capture_output=True, text=True, timeout=600,
                            env=cpu_devices_environment(devices))
    return sharded_run_result(result.returncode, result.stdout, result.stderr)


@pytest.fixture(scope="session")
def one_device(tmp_path_factory):
    """(workdir, result) of the default run on one device (this process), the reference of several tests."""
    workdir = tmp_path_factory.mktemp("one_device") / "run"
    return workdir, sharded_run.run(str(workdir), {})


@functools.lru_cache(maxsize=1)
def _template():
    """The states a run of sharded_run starts from (the stand-in network), to restore checkpoints into."""
    return Experiment.build(sharded_run.config_of({})).template


def _final_params(workdir, arm="oat"):
    manager = ArmCheckpoints(str(workdir), arm)
    state = manager.restore(manager.latest_epoch(), _template())  # saved across devices, restored onto one
    manager.close()
    return jax.device_get((state.params, state.batch_stats))


def _assert_same_training(run, reference, workdir, reference_workdir):
    one_sample = 100 / 75 + 1e-9
    for arm in ("ce", "oat"):
        assert run["summary"]["arms"][arm]["final_test_accuracy"] == pytest.approx(
            reference["summary"]["arms"][arm]["final_test_accuracy"], abs=one_sample)
        for a, b in zip(jax.tree.leaves(_final_params(reference_workdir, arm)),
                        jax.tree.leaves(_final_params(workdir, arm))):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def _assert_same_evaluations(run, reference):
    for size in map(str, sharded_run.EVAL_BATCH_SIZES):
        for decode in ("uniform", "batch"):
            assert run["evaluations"][size]["accuracy"][decode] == pytest.approx(
                reference["evaluations"][size]["accuracy"][decode], abs=100 / 75 + 1e-9)
            np.testing.assert_allclose(run["evaluations"][size]["share"][decode],
                                       reference["evaluations"][size]["share"][decode], atol=1 / 75 + 1e-9)


def test_eight_devices_train_and_evaluate_what_one_device_does(tmp_path, one_device):
    """(Four devices: the fused, per-device-anchor and two-process tests below, each against one device.)"""
    one_workdir, one = one_device
    assert one["devices"] == 1
    assert one["evaluations"]["16"]["accuracy"]["uniform"][0] < 90  # not a comparison of two perfect scores
    many = _run(tmp_path / "eight", 8)
    assert many["devices"] == 8
    _assert_same_training(many, one, tmp_path / "eight", one_workdir)
    _assert_same_evaluations(many, one)


def test_the_fused_epoch_splits_each_batch_over_the_devices_too(tmp_path):
    one = sharded_run.run(str(tmp_path / "one"), {"fused_epoch": True})
    four = _run(tmp_path / "four", 4, fused_epoch=True)
    _assert_same_training(four, one, tmp_path / "four", tmp_path / "one")


def test_two_processes_through_jax_distributed_train_what_one_device_trains(tmp_path, one_device):
    one_workdir, one = one_device
    # A stop asked of the second process alone, 5 steps into the pre-training: both processes agree on it at
    # step 10, save the epoch part-way and stop; the rerun finishes it as if nothing had happened.
    stopped = run_two_processes(tmp_path / "two", 2, extra=((), (5,)))
    assert stopped == [{"stopped": True}] * 2
    saved = ArmCheckpoints(str(tmp_path / "two"), "pretrain")
    # The branch point (epoch 0) and 10 steps into epoch 1, each named by its optimiser step.
    assert [saved._point(step) for step in sorted(saved._manager.all_steps())] == [(0, None), (1, 10)]
    saved.close()
    assert (tmp_path / "two" / "checkpoints" / "pretrain" / "10" / "progress").is_dir()
    first, second = run_two_processes(tmp_path / "two", 2)
    assert (first["devices"], first["processes"]) == (second["devices"], second["processes"]) == (4, 2)
    assert first["summary"] == second["summary"]
    _assert_same_training(first, one, tmp_path / "two", one_workdir)
    _assert_same_evaluations(first, one)
    _assert_same_evaluations(second, one)
    # Process 0 alone wrote the record: one line per arm and epoch, as on one device.
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((one_workdir / "metrics.jsonl").read_text().splitlines()) == 3


def test_the_per_device_anchor_is_each_slice_s_own(tmp_path, monkeypatch, one_device):
    """anchor_scope="device" on 4 devices trains what one device trains with each batch cut into 4 groups,
    each with its own anchor (oat.grouped_oat_loss with groups=4, forced here), and not what the global
    anchor trains."""
    per_device = _run(tmp_path / "per_device", 4, anchor_scope="device")
    with monkeypatch.context() as patch:
        patch.setattr(sharding, "anchor_groups", lambda config, mesh: 4)
        groups = sharded_run.run(str(tmp_path / "groups"), {"anchor_scope": "device"})
    assert groups["devices"] == 1
    _assert_same_training(per_device, groups, tmp_path / "per_device", tmp_path / "groups")
    # On one device the option changes nothing: one group, the global batch's anchor.
    assert sharding.anchor_groups(sharded_run.config_of({"anchor_scope": "device"}), None) == 1
    global_anchor = one_device[0]
    oat_differences = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(_final_params(global_anchor)),
                                                               jax.tree.leaves(_final_params(tmp_path / "per_device")))]
    assert max(oat_differences) > 1e-3  # the option changes OAT training (10x the tolerance above) ...
    for a, b in zip(jax.tree.leaves(_final_params(global_anchor, "ce")),  # ... and not cross-entropy's
                    jax.tree.leaves(_final_params(tmp_path / "per_device", "ce"))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path):
    result = _run(tmp_path / "run", 4, batch_size=10)
    assert result["error"].startswith("ShardingError: batch_size 10 does not divide over the 4 devices")
    assert not (tmp_path / "run").exists()
