"""Command line: ``python -m oat_jax.main --config configs/<experiment>.py --workdir runs/<experiment>``.

Trains the cross-entropy baseline and the OAT arm of one experiment (or resumes them from the workdir) and
prints their test accuracies beside the paper's figure. ``--config.<field>=<value>`` overrides a field.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time


def _interrupted_early(signum, frame):
    print("error: interrupted before training started; nothing was changed", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":
    # Ctrl-C or SIGTERM while the heavy imports below load: one line, not a traceback. main() replaces these
    # handlers with ones that stop training at the next step.
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _interrupted_early)

# Imported after the early signal handlers above.
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from oat_jax import data, distributed  # noqa: E402
from oat_jax import workdir as workdir_lib  # noqa: E402
from oat_jax.checkpoints import CheckpointMismatch  # noqa: E402
from oat_jax.disk_full import WorkdirFull  # noqa: E402
from oat_jax.models.weights import WeightsError  # noqa: E402
from oat_jax.names import CE, OAT  # noqa: E402
from oat_jax.sharding import ShardingError  # noqa: E402
from oat_jax.config_schema import ConfigError, unknown_field, validate_config  # noqa: E402
from oat_jax.train import (StoppedBeforeTraining, TrainingDiverged, request_stop, stop_requested,  # noqa: E402
                           train_and_evaluate)
from oat_jax.workdir import WorkdirBusy, WorkdirMismatch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics.jsonl and summary.json.")

_ARM_NAMES = {CE: "cross-entropy", OAT: "OAT"}  # other arms go by their objective's name


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _print_help() -> None:
    from oat_jax.config_schema import field_help
    print("usage: python -m oat_jax.main --config configs/<experiment>.py --workdir <dir> "
          "[--config.<field>=<value> ...]\n\nTrains (or resumes) an experiment's arms in the workdir and prints "
          "their test accuracies. A config file starts from base_config(); any field can be overridden:\n")
    for name, default, meaning in field_help():
        print(f"  --config.{name}={default!r}\n      {meaning}" if meaning else f"  --config.{name}={default!r}")


def _config_file_problem(path: str) -> str | None:
    """What is wrong with ``path`` as a config file, as an error line; None when it is a readable file."""
    if not path:
        return "--config names no file; pass one, e.g. --config configs/default.py"
    if os.path.isdir(path):
        return f"config file {path} is a folder; pass a file in it, e.g. --config configs/default.py"
    if not os.path.isfile(path):
        return f"config file not found: {path}; pass an existing one, e.g. --config configs/default.py"
    if not os.access(path, os.R_OK):
        return f"config file {path} cannot be read (permission denied); make it readable or pass another"
    return None


def _config_argument(args) -> str | None:
    """The path that ``--config`` names in ``args`` (absl's spellings; the last one counts), without a sweep's
    ":argument"; None when there is none."""
    path = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        name, equals, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "config":
            path = value if equals else (args[i + 1] if i + 1 < len(args) else None)
    return None if path is None else path.split(":", 1)[0]


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _parse_flags(argv):
    """absl's parser, with a user's mistake reported in one line instead of a traceback."""
    if any(arg in ("-h", "--help", "-help", "--helpshort") for arg in argv[1:]):
        _print_help()
        sys.exit(0)
    path = _config_argument(argv[1:])
    problem = None if path is None else _config_file_problem(path)
    if problem:  # before absl loads it: with an override absl raises a traceback of its own
        _fail(problem)
    try:
        rest = flags.FLAGS(argv)
    except OSError as e:  # an override met a config file that failed to load
        _fail(f"cannot load config file {path}: {_last_line(e)}")
    except SyntaxError as e:
        _fail(f"config file {e.filename or path} has a syntax error at line {e.lineno}: {e.msg}; correct it")
    except flags.Error as e:
        message = str(e)
        if "Traceback" in message:  # the config file raised: its first line and the exception, not the stack
            lines = [line for line in message.splitlines() if line.strip()]
            message = f"{lines[0].rstrip(':')}: {lines[-1]}"
        _fail(message)
    except (AttributeError, KeyError) as e:  # an override naming a field the config does not have
        _fail(f"unknown config field in a --config.<field> override: {unknown_field(e)}")
    except (TypeError, ValueError) as e:
        _fail(f"bad --config override: {e}")
    except Exception as e:  # the config file's own code raised (absl passes on all but ValueError)
        _fail(f"cannot load config file {path}: {type(e).__name__}: {_last_line(e)}; correct it")
    if _CONFIG.value is None or not _WORKDIR.value:
        _fail("usage: python -m oat_jax.main --config configs/<experiment>.py --workdir <dir> "
              "[--config.<field>=<value> ...]")
    # "file.py:argument" passes the argument to the file's get_config (a sweep's value)
    path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":", 1)[0]
    problem = _config_file_problem(path)
    if problem:
        _fail(problem)
    try:
        validate_config(_CONFIG.value)
    except ConfigError as e:
        _fail(str(e))
    except Exception as e:  # the config file itself failed to load
        _fail(f"cannot load config file {path}: {type(e).__name__}: {e}")
    return rest


def _workdir_problem(workdir: str) -> str | None:
    """Why the run could not write ``workdir`` (a file, under a file, on a read-only file system or in a folder
    this user cannot write), as an error line; None when it can. Checked before anything runs or is written."""
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.lexists(existing):  # the nearest part of the path that exists: the run makes the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        kind = "a file" if os.path.isfile(existing) else "neither a file nor a folder"
        where = f"is {kind}" if existing == path else f"lies under {existing}, which is {kind}"
        return f"--workdir {workdir} {where}, not a folder; pass a folder's path (a new one, or a run's workdir)"
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        return _unwritable(workdir, existing, read_only)
    return None


def _unwritable(workdir: str, folder: str, read_only: bool) -> str:
    why = "is on a read-only file system" if read_only else "is not writable by this user"
    where = "" if os.path.abspath(folder) == os.path.abspath(workdir) else f" (its folder {folder})"
    return f"--workdir {workdir}{where} {why}; pass a --workdir in a folder you can write to"


def _writing_workdir(error: OSError, workdir: str) -> bool:
    """Whether ``error`` is a refused write (read-only file system, permission) to a path in ``workdir``."""
    if not error.filename or error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
        return False
    folder = os.path.abspath(workdir)
    return os.path.commonpath([folder, os.path.abspath(os.fsdecode(error.filename))]) == folder


def format_summary(summary: dict) -> str:
    """The arms side by side with the paper's figure, as a small text table: the final epoch's test accuracy,
    the validation-selected epoch's (with a validation split), and the oracle's best epoch, picked by the test
    accuracy itself and so never a result."""
    paper = summary.get("paper")
    arms = {arm: workdir_lib.oracle_named(result) for arm, result in summary["arms"].items()}
    selected = any("test_accuracy_at_selected_epoch" in result for result in arms.values())
    columns = [("final", "final_test_accuracy", None)] + (
        [("selected (epoch)", "test_accuracy_at_selected_epoch", "selected_epoch")] if selected else []) + [
        ("oracle best (epoch)", "oracle_best_test_accuracy", "oracle_best_epoch")]
    lines = [f"test accuracy (%) on {summary['dataset']['name']} "
             f"({summary['dataset']['train_samples']} train / {summary['dataset']['test_samples']} test samples"
             + (f", {summary['dataset']['validation_samples']} held out for validation"
                if "validation_samples" in summary["dataset"] else "") + ")",
             f"{'arm':<15}" + "".join(f"{title:>24}" for title, _, _ in columns) + (f"{'paper':>10}" if paper else "")]
    for arm, result in arms.items():
        seeds = len(result["seeds"])
        diverged = "".join(f"  diverged: seed {seed} at epoch {where['epoch']}, step {where['step']}"
                           for seed, where in result.get("diverged", {}).items())
        cells = []
        for _, key, epoch in columns:
            if key not in result:
                cells.append("-")
            elif seeds == 1:
                cells.append(f"{result[key]:.2f}" + (f" ({result[epoch]:>3})" if epoch else ""))
            else:  # mean ± standard deviation over the seeds
                cells.append(f"{result[key]:.2f} ± {result[key + '_std']:.2f}")
        line = f"{_ARM_NAMES.get(arm, arm):<15}" + "".join(f"{cell:>24}" for cell in cells)
        if seeds > 1:
            line += f" ({seeds} seeds)"
        if paper and arm in paper:
            line += f"{paper[arm]:>10.3f}"
        lines.append(line + diverged)
    if paper:
        lines.append(f"paper: {paper['table']}, {paper['setting']}")
    lines.append("oracle: the epoch of highest test accuracy, chosen by looking at the test set; not a result")
    return "\n".join(lines)


def _interrupt(signum, frame):
    """The first Ctrl-C or SIGTERM asks training to stop at the next step (a checkpoint being written is
    completed); a second one stops at once."""
    if stop_requested():
        raise KeyboardInterrupt
    request_stop()


def use_compilation_cache(setting: str) -> str | None:
    """Points JAX's persistent compilation cache at ``setting`` ("" = the user's cache folder, "off" = none),
    unless $JAX_COMPILATION_CACHE_DIR already chose one; returns the folder in use. A resumed run, the next
    seed or the next config then loads the programs it compiled before. JAX writes each entry whole, so runs
    may share the folder."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or setting == "off":
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or None
    import jax
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = setting or os.path.join(cache, "oat_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)  # the eval step takes about 0.5 s
    return folder


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config, workdir = _CONFIG.value, _WORKDIR.value
    problem = _workdir_problem(workdir)
    if problem:
        _fail(problem)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    started = time.perf_counter()
    use_compilation_cache(config.compilation_cache)
    # Until here a signal exits at once (_interrupted_early); from here it asks the run to stop. Before the run's
    # first epoch is saved, that leaves the workdir as it was (StoppedBeforeTraining).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        summary = train_and_evaluate(config, workdir)
    except (ConfigError, data.DatasetError, distributed.DistributedError, ShardingError, WeightsError,
            WorkdirMismatch, WorkdirBusy, CheckpointMismatch) as e:
        _fail(str(e))
    except WorkdirFull as e:  # nothing is lost: the same command resumes once there is space
        _fail(str(e), code=4)
    except OSError as e:  # the checks above passed, yet a write was refused (a mount that changed, say)
        if not _writing_workdir(e, workdir):
            raise
        _fail(_unwritable(workdir, workdir, read_only=e.errno == errno.EROFS))
    except TrainingDiverged as e:
        _fail(str(e), code=3)
    except StoppedBeforeTraining as e:  # nothing to resume: the workdir is as it was
        _fail(str(e), code=130)
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume from the last finished epoch", code=130)
    if not distributed.is_primary():  # process 0 prints the results and writes the files
        print(f"process {distributed.process_index()} of {distributed.process_count()} finished")
        return
    if summary.pop("already_finished", False):
        print(f"{workdir} holds a finished run: nothing was trained, and its results are unchanged "
              f"({os.path.join(workdir, 'summary.json')}); pass another --workdir to train again")
        print(format_summary(summary))
        return
    print(format_summary(summary))
    print(f"wall time {time.perf_counter() - started:.1f} s; outputs in {workdir}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
