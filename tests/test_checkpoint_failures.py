"""Checkpoints that cannot be used and a workdir that fills up: damage is set aside, a checkpoint from another
version or config stops the run with one line and stays, a full disk stops the run with one line and the same
command resumes it."""
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from oat_jax import state as state_lib
from oat_jax import steps, train
from oat_jax import workdir as workdir_lib
from oat_jax.checkpoints import ArmCheckpoints, CheckpointMismatch, quiet_checkpoint_noise
from oat_jax.config_schema import base_config
from oat_jax.data import fashion_mnist
from oat_jax.disk_full import WorkdirFull, is_disk_full
from conftest import STANDIN_MODEL

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The fields of a metrics line that time the run, and so differ between runs of the same training.
TIMINGS = ("epoch_seconds", "compile_seconds")

# What Orbax 0.12.8 raised when a save met a full tmpfs: tensorstore's error, a ValueError without errno.
ORBAX_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/x/1.orbax-checkpoint-tmp/'
                'default.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/x/d/6c2e": Failed to write 2186 '
                "bytes to file 7: No space left on device [os_error_code='28']")


def _template(config, classes, model=STANDIN_MODEL):
    return state_lib.create_replicas(state_lib.cached_model(model, classes), (16, 16, 1), config)


def _at_step(states, step):
    """The states as after ``step`` optimiser steps (a checkpoint is named by its states' step): 13 steps an
    epoch of the synthetic dataset in batches of 16."""
    return states.replace(step=jnp.full_like(states.step, step))


def _run(config, workdir):
    return train.train_and_evaluate(config, str(workdir), report=lambda record: None)


def _metrics(workdir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in open(workdir / "metrics.jsonl")]


def test_damaged_array_data_is_set_aside_and_the_previous_checkpoint_used(synthetic_config, tmp_path):
    """The saved metadata still reads and fits; the arrays' data file is cut short."""
    template = _template(synthetic_config, 4)
    checkpoints = ArmCheckpoints(str(tmp_path), "pretrain")
    checkpoints.save(1, _at_step(template, 13))
    checkpoints.save(2, _at_step(template, 26))
    checkpoints.wait()
    for path in (tmp_path / "checkpoints" / "pretrain" / "26" / "state" / "d").iterdir():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    warnings = []
    with quiet_checkpoint_noise():  # as in a run: the damaged read's late callbacks find Orbax's loop closed
        point = checkpoints.restore_latest(template, warnings.append)
        checkpoints.close()
    assert (point.epoch, point.steps_done, point.metrics) == (1, 0, None)
    assert np.asarray(point.states.step).tolist() == [13]
    assert len(warnings) == 1 and "checkpoints/pretrain/26 cannot be restored" in warnings[0]
    assert (tmp_path / "checkpoints" / "corrupt" / "pretrain-step26").is_dir()


@pytest.mark.parametrize("model, classes, first_difference", [
    (STANDIN_MODEL, 5, "params/head/bias: saved (1, 4) float32, expected (1, 5) float32"),
    ("lightweight", 4, "params/Conv_0/bias: saved (1, 4) float32, expected (1, 6) float32"),
])
def test_a_checkpoint_that_does_not_fit_stops_with_one_line_and_stays(synthetic_config, tmp_path, model, classes,
                                                                      first_difference):
    """Another number of classes (shapes) or another model (tree structure): nothing is set aside."""
    checkpoints = ArmCheckpoints(str(tmp_path), "ce")
    checkpoints.save(3, _at_step(_template(synthetic_config, 4), 39))
    other = _template(synthetic_config, classes, model)
    warnings = []
    with pytest.raises(CheckpointMismatch) as error:
        checkpoints.restore_latest(other, warnings.append)
    with pytest.raises(CheckpointMismatch):
        checkpoints.restore(3, other)
    checkpoints.close()
    message = str(error.value)
    assert "\n" not in message and warnings == []
    assert message.startswith(f"checkpoint {tmp_path}/checkpoints/ce/39 does not fit this run's state "
                              f"({first_difference}")
    assert "use a new --workdir, or the version that made it" in message
    assert (tmp_path / "checkpoints" / "ce" / "39").is_dir() and not (tmp_path / "checkpoints" / "corrupt").exists()


def test_a_part_way_checkpoint_that_does_not_fit_stays(synthetic_config, tmp_path):
    """5 steps into epoch 3 (optimiser step 13 * 2 + 5), saved with the epoch's running metrics."""
    checkpoints = ArmCheckpoints(str(tmp_path), "ce")
    checkpoints.save(3, _at_step(_template(synthetic_config, 4), 31), steps_done=5, metrics=steps.new_metrics(1, 4))
    assert checkpoints._point(31) == (3, 5)
    with pytest.raises(CheckpointMismatch, match=r"checkpoints/ce/31 does not fit .*params/head/bias: saved"):
        checkpoints.restore_latest(_template(synthetic_config, 5), warn=pytest.fail)
    checkpoints.close()
    assert (tmp_path / "checkpoints" / "ce" / "31" / "progress").is_dir()
    assert not (tmp_path / "checkpoints" / "corrupt").exists()


def test_disk_full_errors_are_recognised():
    assert is_disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert is_disk_full(ValueError(ORBAX_ENOSPC))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("writing failed") from cause
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("DATA_LOSS: Error decoding manifest"))


def test_a_full_disk_stops_with_one_line_and_the_same_command_resumes(synthetic_config, tmp_path, monkeypatch):
    """Saving a checkpoint fails as Orbax fails on a full disk; on the rerun, appending to metrics.jsonl fails
    part-way through a line; the rerun after that ends as an uninterrupted run does."""
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 3, 1
    expected = _run(synthetic_config, tmp_path / "straight")
    workdir = tmp_path / "full"
    real_save, saves = ocp.CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        saves.append(step)
        if len(saves) == 3:  # pretrain steps 0 and 13 (epochs 0, 1), then the CE arm's epoch 2 at step 26
            raise ValueError(ORBAX_ENOSPC)
        return real_save(self, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ocp.CheckpointManager, "save", save)
        with pytest.raises(WorkdirFull) as error:
            _run(synthetic_config, workdir)
    assert str(error.value) == (f"no space left on device writing {workdir}/checkpoints/ce/26; free space there (or "
                                "use another --workdir) and rerun the same command to resume")

    real_fsync, appends = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            appends.append(fd)
            if len(appends) == 2:  # the CE arm's epoch 3: the disk took half of its line
                os.ftruncate(fd, os.fstat(fd).st_size - 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(workdir_lib.os, "fsync", fsync)
        with pytest.raises(WorkdirFull, match=f"no space left on device writing {workdir}/metrics.jsonl; "):
            _run(synthetic_config, workdir)
    assert _run(synthetic_config, workdir) == expected
    assert _metrics(workdir) == _metrics(tmp_path / "straight")


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the given size at tmp_path/disk (root only, where mounting is allowed), unmounted after the
    test; resized with ``small_disk.resize(size)``."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size, *options):
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]), "tmpfs",
                                 str(disk)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(disk)
        return disk
    mount.resize = lambda size: mount(size, "remount")
    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_real_full_disk_mid_run_resumes_to_the_same_result(synthetic_config, tmp_path, small_disk, caplog):
    expected = _run(synthetic_config, tmp_path / "straight")  # about 1.1 MB of checkpoints and metrics
    workdir = small_disk("600k") / "run"
    with pytest.raises(WorkdirFull, match=f"no space left on device writing {workdir}/"):
        _run(synthetic_config, workdir)
    assert not any(record.exc_info for record in caplog.records)  # Orbax's threads logged no traceback
    small_disk.resize("4m")
    assert _run(synthetic_config, workdir) == expected
    assert _metrics(workdir) == _metrics(tmp_path / "straight")


def _main(workdir, *overrides):
    return subprocess.run([sys.executable, "-m", "oat_jax.main", "--config", str(ROOT / "configs/default.py"),
                           "--workdir", str(workdir), "--config.train_limit=500", "--config.test_limit=200",
                           "--config.num_epochs=2", "--config.pretrain_epochs=1", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(fashion_mnist.DEFAULT_DIR) and not os.environ.get("OAT_DATA_DIR"),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@needs_fashion_mnist
def test_cli_full_disk_is_one_line_with_status_4(small_disk):
    workdir = small_disk("64k") / "run"  # room for config.json, not for the first checkpoint
    result = _main(workdir)
    assert result.returncode == 4, result.stderr[-3000:]
    assert result.stderr.strip() == (f"error: no space left on device writing {workdir}/checkpoints/pretrain/0; free "
                                     "space there (or use another --workdir) and rerun the same command to resume")


@needs_fashion_mnist
def test_cli_checkpoint_of_another_model_is_one_line_with_status_2(tmp_path):
    """A workdir whose checkpoint has 4 classes (as if made by another version), resumed on Fashion-MNIST's 10."""
    workdir = tmp_path / "run"
    checkpoints = ArmCheckpoints(str(workdir), "pretrain")
    checkpoints.save(0, state_lib.create_replicas(state_lib.cached_model("lightweight", 4), (28, 28, 1),
                                                  base_config()))
    checkpoints.close()
    result = _main(workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: checkpoint {workdir}/checkpoints/pretrain/0 does not fit this run's state "
                                    "(params/head/bias: saved (1, 4) float32, expected (1, 10) float32")
    assert (workdir / "checkpoints" / "pretrain" / "0").is_dir()
    assert not (workdir / "checkpoints" / "corrupt").exists()
