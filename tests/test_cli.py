"""End to end through the command line, on real Fashion-MNIST (a subset), in subprocesses."""
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import needs_fashion_mnist

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The fields of a metrics line that time the run, and so differ between runs of the same training.
TIMINGS = ("epoch_seconds", "compile_seconds")
QUICK = ["--config.train_limit=4000", "--config.test_limit=1000", "--config.num_epochs=3",
         "--config.pretrain_epochs=1"]




def _command(workdir, *overrides, config="configs/default.py"):
    return [sys.executable, "-m", "oat_jax.main", "--config", str(ROOT / config), "--workdir", str(workdir),
            *overrides]


def _run(workdir, *overrides, **kwargs):
    return subprocess.run(_command(workdir, *overrides, **kwargs), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


FINISHED_RUN_GROUP = pytest.mark.xdist_group("cli_finished_run")  # its users on one worker: one run


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    result = _run(workdir, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@FINISHED_RUN_GROUP
@needs_fashion_mnist
def test_both_arms_learn_on_real_fashion_mnist(finished_run):
    workdir, result = finished_run
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["dataset"]["train_samples"] == 4000 and summary["dataset"]["test_samples"] == 1000
    for arm in ("ce", "oat"):
        assert summary["arms"][arm]["final_epoch"] == 3
        # Chance is 10 %. 375 steps at lr 0.001 from PyTorch's small default initialisation (init="torch") reach
        # about 30-60 %, depending on the arm.
        assert summary["arms"][arm]["final_test_accuracy"] > 25
    assert "cross-entropy" in result.stdout and "OAT" in result.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["epoch"]) for r in records] == [("pretrain", 1), ("ce", 2), ("ce", 3), ("oat", 2),
                                                         ("oat", 3)]
    for record in records:
        assert {"train_loss", "test_accuracy", "epoch_seconds"} <= set(record)
    for record in records[3:]:
        assert 0 < record["anchor_min"] <= 0.1 <= record["anchor_max"] < 1
        assert 0 < record["anchor_entropy"] <= 2.3026


@FINISHED_RUN_GROUP
@needs_fashion_mnist
def test_checkpoints_exist_and_restore(finished_run):
    workdir, _ = finished_run
    config = json.loads((workdir / "config.json").read_text())
    steps = -(-config["train_limit"] // config["batch_size"])  # an epoch's optimiser steps, which name checkpoints
    for arm, epoch in (("pretrain", 0), ("pretrain", 1), ("ce", 3), ("oat", 3)):
        assert (workdir / "checkpoints" / arm / str(epoch * steps)).is_dir()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["ce", "oat", "pretrain"]
    # Restore the OAT arm's final state in a fresh process and evaluate it: the summary's figure comes back.
    code = """
import json, sys
from oat_jax import evaluation
from oat_jax.checkpoints import ArmCheckpoints
from oat_jax.config_schema import base_config
from oat_jax.experiment import Experiment
config = base_config()
config.update_from_flattened_dict({k: v for k, v in json.load(open(sys.argv[1] + '/config.json')).items()
                                   if k != 'paper'})
exp = Experiment.build(config)
manager = ArmCheckpoints(sys.argv[1], 'oat')
epoch = manager.latest_epoch()
state = manager.restore(epoch, exp.template)
manager.close()
print(json.dumps({"epoch": epoch, "accuracy": evaluation.evaluate(exp, state)}))
"""
    out = subprocess.run([sys.executable, "-c", code, str(workdir)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    restored = json.loads(out.stdout.strip().splitlines()[-1])
    summary = json.loads((workdir / "summary.json").read_text())
    assert restored["epoch"] == 3
    assert restored["accuracy"]["batch"] == [summary["arms"]["oat"]["final_test_accuracy"]]  # OAT's decoding


@FINISHED_RUN_GROUP
@needs_fashion_mnist
def test_finished_run_is_not_retrained(finished_run):
    workdir, first = finished_run
    files = {name: (workdir / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}
    dates = {name: (workdir / name).stat().st_mtime_ns for name in files}
    again = _run(workdir, *QUICK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {name: (workdir / name).read_bytes() for name in files} == files
    assert {name: (workdir / name).stat().st_mtime_ns for name in files} == dates  # not even rewritten
    assert f"{workdir} holds a finished run: nothing was trained" in again.stdout
    assert first.stdout.splitlines()[-4:-1] == again.stdout.splitlines()[-3:]  # the same results table


def _lines(path):
    return path.read_text().splitlines()


def _metrics_without_times(workdir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _signal_during_training(workdir, signum, delay):
    """Starts the run and sends it ``signum`` ``delay`` seconds after it prints its first epoch line, when that
    epoch is checkpointed and the next one is being trained; returns (exit status, stdout from that line on,
    stderr)."""
    process = subprocess.Popen(_command(workdir, *QUICK), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(600, process.kill)
    watchdog.start()
    first_epoch = next((line for line in process.stdout if "] epoch" in line), "")  # "" if it ended without one
    time.sleep(delay)
    process.send_signal(signum)
    stdout, stderr = process.communicate()
    watchdog.cancel()
    return process.returncode, first_epoch + stdout, stderr


@FINISHED_RUN_GROUP
@needs_fashion_mnist
def test_killed_at_random_points_resumes_to_the_same_summary(finished_run, tmp_path):
    """kill -9, SIGTERM and Ctrl-C (SIGINT) at random moments of a real run's training, each followed by a rerun
    of the same command; the last rerun finishes with exactly the uninterrupted run's summary and metrics."""
    reference = finished_run[0]
    # Each signal comes at most half the reference's fastest epoch after the run's first finished epoch, so
    # early in the next: each run finishes one epoch (of 5), and the rerun ends the last two.
    fastest_epoch = min(record["epoch_seconds"] for record in map(json.loads, _lines(reference / "metrics.jsonl")))
    rng = random.Random(20261127)
    workdir = tmp_path / "interrupted"
    for signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        returncode, stdout, stderr = _signal_during_training(workdir, signum, rng.uniform(0.0, 0.5) * fastest_epoch)
        context = (signum, returncode, stdout, stderr[-2000:])
        # It landed during training: after an epoch of this run, and before the results table.
        assert "] epoch" in stdout and "test accuracy (%)" not in stdout, context
        assert "Traceback" not in stderr, context
        # kill -9 cannot be caught: killed by the signal (-9). SIGTERM and SIGINT ask training to stop at the
        # next step, which exits with status 130 (anything else, 2 or 0 say, would be a bug).
        assert returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 130), context
        if signum != signal.SIGKILL:  # its one line says how to go on
            assert "rerun the same command to resume" in stderr.strip().splitlines()[-1], context
    resumed = _run(workdir, *QUICK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((workdir / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    assert _metrics_without_times(workdir) == _metrics_without_times(reference)


@pytest.mark.parametrize("overrides, message", [
    (["--config.pretrain_epochs=7", "--config.num_epochs=5"],
     "got 7; set --config.pretrain_epochs too (e.g. --config.pretrain_epochs=2)"),
    (["--config.learning_rat=0.1"], "'learning_rat'; Did you mean \"learning_rate\" instead of \"learning_rat\"?"),
    (["--config.num_epochs=ten"], "num_epochs"),
    (["--config.dataset=mnist_typo"], "unknown dataset 'mnist_typo'"),
    (["--config.model=resnet"], "unknown model 'resnet'"),
])
def test_bad_config_exits_with_one_line(tmp_path, overrides, message):
    result = _run(tmp_path / "bad", *overrides)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2 and "\\n" not in result.stderr  # no escaped newline
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_missing_config_file_is_named(tmp_path):
    result = _run(tmp_path / "w", config="configs/no_such_experiment.py")
    assert result.returncode == 2 and "no_such_experiment.py" in result.stderr and "Traceback" not in result.stderr


def _one_line_refusal(result, *expected):
    """The run refused with exit status 2 and one line holding each of ``expected``, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for text in expected:
        assert text in lines[0]


@pytest.mark.parametrize("config, expected", [
    ("configs/does_not_exist.py", ["config file not found: ", "does_not_exist.py", "configs/default.py"]),
    ("configs/", ["is a folder; pass a file in it, e.g. --config configs/default.py"]),
    ("syntax_error.py", ["syntax_error.py has a syntax error at line 2"]),
    ("raises.py", ["raises.py: NameError: name 'undefined_name' is not defined"]),
])
def test_a_bad_config_file_with_an_override_is_one_line(tmp_path, config, expected):
    """With a --config.<field> override, absl loads the file while parsing the override and raised its own
    traceback (OSError for a missing file or a folder); without one it was already a line."""
    (tmp_path / "syntax_error.py").write_text("def get_config():\n    return (\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    return undefined_name\n")
    path = str(tmp_path / config) if config.endswith(("syntax_error.py", "raises.py")) else config
    for overrides in (["--config.learning_rate=0.01"], []):
        result = _run(tmp_path / "run", *overrides, config=path)
        _one_line_refusal(result, *expected)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["--config.learning_rate=inf"], "learning_rate must be a finite number, got inf"),
    (["--config.arms=ce,square", "--config.square_m=nan"], "square_m must be a finite number, got nan"),
    (["--config.arms=ce,,oat"], "arms 'ce,,oat' has an empty name"),
])
def test_a_non_finite_value_or_an_empty_arm_is_one_line(tmp_path, overrides, expected):
    """Refused before anything is written: inf trained and diverged, NaN trained on with a warning that blamed
    the learning rate, and an empty arm was dropped silently."""
    _one_line_refusal(_run(tmp_path / "run", *overrides), expected)
    assert os.listdir(tmp_path) == []


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a folder\n")
    for workdir, expected in ((notes, f"--workdir {notes} is a file, not a folder"),
                              (notes / "run", f"--workdir {notes / 'run'} lies under {notes}, which is a file")):
        _one_line_refusal(_run(workdir, "--config.learning_rate=0.01"), expected, "pass a folder's path")
        assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # nothing written
        assert notes.read_text() == "a file, not a folder\n"


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty folder no run can write: as root (whom a folder's mode does not stop) a read-only tmpfs
    mounted there, as the full-disk tests in test_checkpoint_failures.py mount one; otherwise a folder
    with mode 0o555. Yields (folder, the words the error uses for it)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder, "is not writable by this user"
        finally:
            folder.chmod(0o755)  # so that pytest can remove it
        return
    if not shutil.which("mount"):
        pytest.skip("as root only a read-only mount makes a folder unwritable, and there is no mount command")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"as root only a read-only mount makes a folder unwritable, and mounting failed: "
                    f"{mounted.stderr.strip()}")
    try:
        yield folder, "is on a read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_workdir_that_cannot_be_written_is_one_line(read_only_folder):
    """An existing read-only folder, and a new folder under one: refused before the dataset loads, where
    taking the workdir's .lock raised errno 30 (or 13) as a traceback."""
    folder, why = read_only_folder
    for workdir in (folder, folder / "new" / "run"):
        _one_line_refusal(_run(workdir, "--config.learning_rate=0.01"), f"--workdir {workdir}", why,
                          "pass a --workdir in a folder you can write to")
        assert os.listdir(folder) == []


def test_a_write_refused_after_the_checks_is_one_line_too(tmp_path):
    """A workdir that passed the checks but whose write is refused later (a file system remounted read-only,
    say) ends in the same line; a refused write outside the workdir is not blamed on it."""
    script = """
import errno, sys
from absl import app
from oat_jax import main as cli
def refused(config, workdir):
    raise OSError(errno.EROFS, "Read-only file system", sys.argv[1])
cli._workdir_problem = lambda workdir: None  # as if the file system turned read-only after the check
cli.train_and_evaluate = refused
app.run(cli.main, argv=["main", "--config", sys.argv[2], "--workdir", sys.argv[3]], flags_parser=cli._parse_flags)
"""
    workdir, config = tmp_path / "run", str(ROOT / "configs/default.py")
    for path, inside in ((workdir / ".lock", True), (tmp_path / "run2" / ".lock", False)):
        result = subprocess.run([sys.executable, "-c", script, str(path), config, str(workdir)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        if inside:
            _one_line_refusal(result, f"--workdir {workdir} is on a read-only file system")
        else:  # another folder whose name starts with the workdir's: not the workdir's problem
            assert result.returncode == 1 and "OSError: [Errno 30] Read-only file system" in result.stderr


def test_missing_dataset_says_how_to_get_it(tmp_path):
    env = dict(os.environ, OAT_DATA_DIR="", TFDS_DATA_DIR=str(tmp_path / "tfds"))
    result = subprocess.run(_command(tmp_path / "w", "--config.data_dir=" + str(tmp_path / "empty")), cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "empty") in result.stderr


@needs_fashion_mnist
def test_missing_pretrained_weights_stop_before_anything_is_written(tmp_path):
    env = dict(os.environ, OAT_WEIGHTS_DIR=str(tmp_path / "weights"), TORCH_HOME=str(tmp_path / "torch"),
               HOME=str(tmp_path / "home"))
    workdir = tmp_path / "run"
    result = subprocess.run(_command(workdir, config="configs/table1_learning_rate.py:0.01"), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "resnet18-f37072fd.pth" in result.stderr and "Traceback" not in result.stderr
    assert not workdir.exists()


def test_a_sweep_value_the_paper_lacks_is_one_line(tmp_path):
    result = _run(tmp_path / "run", config="configs/table2_batch_size.py:48")
    assert result.returncode == 2 and "Table 2 has batch sizes 32, 64, 128" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_the_compilation_cache_defaults_to_the_users_cache_folder(tmp_path):
    """Runs keep XLA's compiled programs in ${XDG_CACHE_HOME:-~/.cache}/oat_jax/xla, or where
    compilation_cache says; "off" keeps none, and an explicit $JAX_COMPILATION_CACHE_DIR wins."""
    script = """
import json, sys
import jax
from oat_jax.main import use_compilation_cache
found = {}
for setting in ("", sys.argv[1], "off"):
    jax.config.update("jax_compilation_cache_dir", None)
    found[setting or "default"] = [use_compilation_cache(setting), jax.config.jax_compilation_cache_dir]
print(json.dumps(found))
"""
    environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environment["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    chosen = str(tmp_path / "chosen")
    result = subprocess.run([sys.executable, "-c", script, chosen], env=environment, capture_output=True, text=True,
                            check=True)
    default = str(tmp_path / "xdg" / "oat_jax" / "xla")
    assert json.loads(result.stdout) == {"default": [default, default], chosen: [chosen, chosen], "off": [None, None]}
    environment["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "env")
    result = subprocess.run([sys.executable, "-c", script, chosen], env=environment, capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout)["default"][0] == str(tmp_path / "env")


def test_help_lists_every_field_with_its_default_and_meaning():
    from oat_jax.config_schema import base_config
    result = subprocess.run([sys.executable, "-m", "oat_jax.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
    for name in base_config().keys():
        assert f"--config.{name}=" in result.stdout, name
    assert "--config.learning_rate=0.001\n      optax SGD with momentum" in result.stdout
    assert "--config.init='torch'\n      \"torch\" = PyTorch's default for conv and dense layers, as the paper's " \
           "code had" in result.stdout  # a comment continued on the schema's next line is joined
