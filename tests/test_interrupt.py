"""Ctrl-C or SIGTERM before a run's first epoch is saved (issue 24): no file left in the workdir, no folder the
run made, status 130 and one line; a second Ctrl-C stops at once. In process, with the stop requested from
inside the steps of start-up (dataset loading, the workdir's files, the first checkpoint); then through the
command line, with signals sent while the dataset loads."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from oat_jax import data, steps, train
from oat_jax.data import fashion_mnist
from oat_jax import workdir as workdir_lib
from oat_jax.checkpoints import ArmCheckpoints
from conftest import SYNTHETIC

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOADING = "stopped_while_loading_for_tests"
_on_loading = []  # what the loader below does part-way, as a signal handler would: set by each test


@data.register_dataset(LOADING)
def _load_while_stopping(data_dir: str, image_size: int = 0) -> data.Dataset:
    for action in _on_loading:
        action()
    return data.load_dataset(SYNTHETIC)


def _second_ctrl_c():
    """What main's handler does on a second signal: raise at once, wherever the run is."""
    raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    yield
    _on_loading.clear()
    train._STOP.clear()  # a failing test must not stop the next one


def _tree(folder: pathlib.Path) -> dict:
    """Every entry under ``folder``: a file's bytes and modification time, "folder" for a folder."""
    return {str(path.relative_to(folder)): "folder" if path.is_dir() else (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


def _contents(tree: dict) -> dict:
    """``_tree`` without the modification times (a config.json put back is written again)."""
    return {path: entry if entry == "folder" else entry[0] for path, entry in tree.items()}


def _counting_steps(monkeypatch) -> list:
    """Counts the training steps run (none may run before a stop that came first)."""
    real, calls = steps.train_step_replicas, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(steps, "train_step_replicas", counted)
    return calls


def _workdirs(tmp_path: pathlib.Path) -> list[pathlib.Path]:
    """A new path two folders deep, an empty folder, and a folder holding only another config's config.json and
    a file of the user's: the run may make the first, and put the others back as they were."""
    (tmp_path / "empty").mkdir(parents=True)
    other = tmp_path / "other_config"
    other.mkdir()
    (other / "config.json").write_text('{"learning_rate": 0.5}\n')
    (other / "notes.txt").write_text("mine\n")
    return [tmp_path / "new" / "run", tmp_path / "empty", other]


def test_a_stop_while_the_dataset_loads_writes_nothing(synthetic_config, tmp_path, monkeypatch):
    """The stop, held by main's handler until loading ends, used to be seen only at the first epoch, after
    config.json, metrics.jsonl, .lock and checkpoints/pretrain/0 were written. A second stop (main's handler
    raises) in the middle of loading ends the run at once, also writing nothing."""
    synthetic_config.dataset = LOADING
    calls = _counting_steps(monkeypatch)
    for actions in ([train.request_stop], [train.request_stop, _second_ctrl_c]):
        _on_loading[:] = actions
        for workdir in _workdirs(tmp_path / str(len(actions))):
            before = _tree(tmp_path)
            with pytest.raises(train.StoppedBeforeTraining, match="^interrupted before training started; "
                                                                  "nothing was written$"):
                train.train_and_evaluate(synthetic_config, str(workdir))
            assert _tree(tmp_path) == before, workdir
            assert not train.stop_requested()  # the stop ended with the run it stopped
    assert not (tmp_path / "1" / "new").exists() and calls == []


def _stop_after(monkeypatch, owner, name, action=train.request_stop):
    """Makes ``owner.name`` (a step of the run's start-up) do what it does, then ``action``."""
    real = getattr(owner, name)

    def then_stop(*args, **kwargs):
        result = real(*args, **kwargs)
        action()
        return result
    monkeypatch.setattr(owner, name, then_stop)


# The moments of start-up after the workdir is taken, each after one more of its files is written: config.json,
# the TensorBoard folder, the pre-training's starting checkpoint (the last before the first step). The last
# case is a second Ctrl-C, which main's handler raises at once, while that checkpoint is written in the background.
MOMENTS = {
    "config.json written": (workdir_lib, "record_config", train.request_stop),
    "tensorboard folder made": (train, "TensorBoardLog", train.request_stop),
    "first checkpoint saved": (ArmCheckpoints, "save", train.request_stop),
    "second ctrl-c while the first checkpoint is written": (ArmCheckpoints, "save", _second_ctrl_c),
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_stop_after_the_workdir_is_taken_puts_it_back(synthetic_config, tmp_path, monkeypatch, moment):
    """A workdir the run made is removed (with the folders above it that it made), one that was there is put
    back as it was (its config.json too), and no step is trained."""
    _stop_after(monkeypatch, *MOMENTS[moment])
    calls = _counting_steps(monkeypatch)
    for workdir in _workdirs(tmp_path):
        before = _contents(_tree(tmp_path))
        with pytest.raises(train.StoppedBeforeTraining, match="^interrupted before the first epoch was saved; "
                                                              f"nothing was kept in {re.escape(str(workdir))}$"):
            train.train_and_evaluate(synthetic_config, str(workdir))
        assert _contents(_tree(tmp_path)) == before, workdir
        assert not train.stop_requested()
    assert calls == []
    assert sorted(os.listdir(tmp_path)) == ["empty", "other_config"]  # "new" went with the run folder in it


def test_a_stop_leaves_a_run_that_has_something_to_resume(synthetic_config, tmp_path, monkeypatch):
    """A workdir holding a run (an epoch logged) is never put back: a stop while the dataset loads leaves every
    file as it was, and one after the workdir is taken is the usual stop, to be resumed. So is a stop part-way
    through a new run's first epoch, whose progress is saved."""
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 2, 1
    synthetic_config.dataset = LOADING  # which stops while loading when a test asks it to
    workdir = tmp_path / "run"

    def stop_after_the_first_epoch(record):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(synthetic_config, str(workdir), report=stop_after_the_first_epoch)
    logged = (workdir / "metrics.jsonl").read_text()
    assert json.loads(logged)["epoch"] == 1

    _on_loading[:] = [train.request_stop]
    before = _tree(tmp_path)
    with pytest.raises(train.StoppedBeforeTraining, match="nothing was written"):
        train.train_and_evaluate(synthetic_config, str(workdir))
    assert _tree(tmp_path) == before
    _on_loading.clear()

    _stop_after(monkeypatch, workdir_lib, "record_config")
    with pytest.raises(KeyboardInterrupt) as stopped:
        train.train_and_evaluate(synthetic_config, str(workdir))
    assert not isinstance(stopped.value, train.StoppedBeforeTraining)
    assert (workdir / "metrics.jsonl").read_text() == logged and (workdir / "checkpoints" / "pretrain").is_dir()
    monkeypatch.undo()

    real, calls = steps.train_step_replicas, []

    def stop_at_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            train.request_stop()
        return real(*args, **kwargs)
    monkeypatch.setattr(steps, "train_step_replicas", stop_at_the_third_step)
    with pytest.raises(train.EpochStopped):
        train.train_and_evaluate(synthetic_config, str(tmp_path / "part_way"))
    assert (tmp_path / "part_way" / "config.json").is_file()
    assert sorted(os.listdir(tmp_path / "part_way" / "checkpoints" / "pretrain")) == ["0", "3"]  # 3 steps done


def test_a_second_ctrl_c_stops_at_once():
    """main's handler: the first SIGINT asks the run to stop at its next step, the second raises at once."""
    from oat_jax import main as cli
    previous = signal.signal(signal.SIGINT, cli._interrupt)
    try:
        signal.raise_signal(signal.SIGINT)
        assert train.stop_requested()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(fashion_mnist.DEFAULT_DIR) and not os.environ.get("OAT_DATA_DIR"),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
SUBSET = ["--config.train_limit=2000", "--config.test_limit=500", "--config.num_epochs=2",
          "--config.pretrain_epochs=1", "--config.progress=False"]

# The command line's main, run as ``python -m oat_jax.main`` runs it, with Fashion-MNIST's reader made to say
# "loading" on stdout when it starts and then wait for a line on stdin: the test signals it while it waits.
_HELD_LOADING = """
import sys
from absl import app
from oat_jax import main as cli
from oat_jax.data import fashion_mnist
read_idx = fashion_mnist.read_idx
def held(path):
    print("loading", flush=True)
    sys.stdin.readline()
    return read_idx(path)
fashion_mnist.read_idx = held
app.run(cli.main, argv=["main", "--config", sys.argv[1], "--workdir", sys.argv[2], *sys.argv[3:]],
        flags_parser=cli._parse_flags)
"""


@needs_fashion_mnist
@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_while_the_command_line_loads_the_dataset(tmp_path, signals):
    """One Ctrl-C while Fashion-MNIST is read takes effect once it is read: status 130, one line, no workdir.
    A second one ends the run at once, the read never finished."""
    workdir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", _HELD_LOADING, str(ROOT / "configs/default.py"), str(workdir),
                                *SUBSET], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        assert process.stdout.readline() == "loading\n", process.communicate()[1][-3000:]
        for _ in range(signals):
            process.send_signal(signal.SIGINT)
            time.sleep(0.5)  # each handled before the next is sent
        if signals == 1:
            process.stdin.write("go on\n")
            process.stdin.flush()
        stdout, stderr = process.communicate()
    finally:
        watchdog.cancel()
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines() == ["error: interrupted before training started; nothing was written"]
    assert os.listdir(tmp_path) == []


def _has_open(pid: int, name: str) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # a descriptor closed while looked at, or the process gone
        return False


@needs_fashion_mnist
@pytest.mark.skipif(not os.path.isdir(f"/proc/{os.getpid()}/fd"), reason="needs /proc to see the dataset read")
def test_sigterm_while_the_command_line_reads_the_dataset(tmp_path):
    """The command line as a user runs it, sent SIGTERM while it has Fashion-MNIST's training images open."""
    workdir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "oat_jax.main", "--config", str(ROOT / "configs/default.py"),
                                "--workdir", str(workdir), *SUBSET], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        while process.poll() is None and not _has_open(process.pid, "train-images-idx3-ubyte.gz"):
            time.sleep(0.001)
        reading = process.poll() is None
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate()
    finally:
        watchdog.cancel()
    assert reading, stderr[-3000:]  # the signal came while the file was being read
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines() == ["error: interrupted before training started; nothing was written"]
    assert os.listdir(tmp_path) == []
