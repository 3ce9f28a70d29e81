"""One run per workdir at a time: a live holder refuses a second run in one line naming its process; a holder
killed with SIGKILL leaves a stale lock that the next run takes over; a run releases the lock however it ends."""
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from oat_jax import experiment, train, workdir as workdir_lib
from oat_jax.data import fashion_mnist
from oat_jax.workdir import WorkdirBusy, WorkdirMismatch, hold_lock
from conftest import run_two_processes

ROOT = pathlib.Path(__file__).resolve().parent.parent
_HOLDER = ("import sys, time; from oat_jax.workdir import hold_lock\n"
           "with hold_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path / "run"``'s lock, started and waited for until it holds it."""
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "run")], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        process.wait()


def _run(config, workdir, report=lambda record: None):
    config.num_epochs, config.pretrain_epochs = 2, 1
    return train.train_and_evaluate(config, str(workdir), report=report)


def test_a_live_holder_refuses_a_second_run_and_a_killed_one_is_taken_over(synthetic_config, tmp_path, holder):
    run = tmp_path / "run"
    busy = f"workdir {run} is in use by another run (process {holder.pid} on host "
    with pytest.raises(WorkdirBusy, match=re.escape(busy) + r".*started \d{4}-\d\d-\d\d \d\d:\d\d UTC\); wait"):
        with hold_lock(str(run)):
            pass
    with pytest.raises(WorkdirBusy, match=re.escape(busy)):
        _run(synthetic_config, run)
    assert os.listdir(run) == [workdir_lib.LOCK_FILE]  # the refused run wrote nothing
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (run / workdir_lib.LOCK_FILE).read_text()  # the dead holder's record stays...
    with hold_lock(str(run)):  # ...but its lock went with it
        assert f"process {os.getpid()} " in (run / workdir_lib.LOCK_FILE).read_text()
    assert (run / workdir_lib.LOCK_FILE).read_text() == ""


def test_a_run_releases_the_lock_when_it_raises_or_returns_and_the_lock_file_is_no_run(synthetic_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"learning_rate": 0.5}')
    (run / workdir_lib.LOCK_FILE).write_text("process 1 on host gone, started 2000-01-01 00:00 UTC\n")

    def interrupt(record):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # a lock file and a config do not make a trained run: no mismatch
        _run(synthetic_config, run, report=interrupt)
    with hold_lock(str(run)):
        pass
    summary = _run(synthetic_config, run)  # resumes
    assert summary["arms"]["oat"]["final_epoch"] == 2
    with hold_lock(str(run)):
        pass


def test_a_run_that_trained_there_between_the_check_and_the_lock_is_still_refused(synthetic_config, tmp_path,
                                                                                   monkeypatch):
    run = tmp_path / "run"
    check_inputs = experiment.check_inputs  # called while the experiment is built, before the lock is taken

    def another_run_trains_meanwhile(config, dataset):
        check_inputs(config, dataset)
        run.mkdir()
        (run / "config.json").write_text('{"learning_rate": 0.5}')
        (run / "metrics.jsonl").write_text("")
    monkeypatch.setattr(experiment, "check_inputs", another_run_trains_meanwhile)
    with pytest.raises(WorkdirMismatch, match="holds a run with a different config"):
        _run(synthetic_config, run)
    assert (run / "config.json").read_text() == '{"learning_rate": 0.5}'
    with hold_lock(str(run)):  # released
        pass


def test_the_processes_of_a_run_all_stop_when_process_0_finds_the_workdir_busy(tmp_path, holder, monkeypatch):
    """Only process 0 takes the lock (the others share the workdir by design); none is left waiting for it."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's oat_jax, whatever is installed
    first, second = run_two_processes(tmp_path / "run", 1)
    assert first["error"].startswith(f"WorkdirBusy: workdir {tmp_path / 'run'} is in use by another run "
                                     f"(process {holder.pid} on host ")
    assert second["error"] == f"WorkdirBusy: workdir {tmp_path / 'run'} was refused by process 0 (its error says why)"
    assert os.listdir(tmp_path / "run") == [workdir_lib.LOCK_FILE]


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_DIR) and not os.environ.get("OAT_DATA_DIR"),
                    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_the_command_line_refuses_a_busy_workdir_in_one_line(tmp_path, holder):
    result = subprocess.run([sys.executable, "-m", "oat_jax.main", "--config", str(ROOT / "configs/default.py"),
                             "--workdir", str(tmp_path / "run"), "--config.train_limit=64", "--config.test_limit=64"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: workdir {tmp_path / 'run'} is in use by another run "
                                                   f"(process {holder.pid} on host "), result.stderr
