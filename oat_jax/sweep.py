"""``python -m oat_jax.sweep``: tune each arm on validation accuracy, then confirm the choice on fresh seeds.

    python -m oat_jax.sweep --config configs/<exp>.py --grid learning_rate=3e-4,1e-3,3e-3 --seeds 100 \\
        --out sweeps/<exp> [--parallel N] [--config.<field>=<value> ...]
    python -m oat_jax.sweep confirm sweeps/<exp> --seeds 200-209 [--parallel N]

The first form trains one workdir per grid point and seed (``<out>/<field>=<value>,.../seed_<s>``, each an
ordinary ``oat_jax.main`` run, so it resumes exactly) and writes ``<out>/selection.json``: for every arm the
grid point whose validation accuracy at its validation-selected epoch is highest. The test set is never read
to choose. ``confirm`` trains each arm at its chosen point on new seeds under ``<out>/confirm/``; arms that
chose the same point share one run. A rerun of either skips finished workdirs and resumes the others.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from oat_jax import workdir as workdir_lib
from oat_jax.objectives import parse_arms

SWEEP_FILE, SELECTION_FILE = "sweep.json", "selection.json"
CONFIRM_DIR, LOGS_DIR = "confirm", "logs"
TIE_POINTS = 0.1  # validation accuracies this close count as a tie, which goes to the lower learning rate
# oat_jax.main's exit status for a run whose shared pre-training diverged: every arm of the point diverged.
DIVERGED_EXIT = 3
# Runs side by side: one process on 2 cores gave the most epochs per hour (XLA already uses both cores)
# (benchmarks/results/cpu_sweep_throughput.json).
DEFAULT_PARALLEL = 1


class SweepError(Exception):
    """A mistake the user can fix; one line saying what and how."""


# ------------------------------------------------------------------------------------------------ the grid

def parse_grid(axes: list[str]) -> dict[str, list]:
    """``["learning_rate=1e-3,3e-3"]`` -> {"learning_rate": [0.001, 0.003]} (numbers where they parse)."""
    grid = {}
    for axis in axes:
        field, _, values = axis.partition("=")
        field = field.strip().removeprefix("--config.")
        items = [value.strip() for value in values.split(",")]
        if not field or not values or any(not item for item in items):
            raise SweepError(f"--grid {axis!r}: write it as <field>=<value>,<value>,... e.g. "
                             "--grid learning_rate=1e-3,3e-3")
        if field in grid:
            raise SweepError(f"--grid names {field} twice; give all its values in one --grid")
        if field in ("seed", "num_seeds"):
            raise SweepError(f"--grid {field}: seeds are given by --seeds, not as a grid axis")
        grid[field] = [_number(item) for item in items]
        if len(set(map(repr, grid[field]))) < len(items):
            raise SweepError(f"--grid {axis!r} repeats a value")
    if not grid:
        raise SweepError("no --grid given; e.g. --grid learning_rate=3e-4,1e-3,3e-3")
    return grid


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_seeds(text: str) -> list[int]:
    """``"100"``, ``"200-209"`` or ``"1,3,5"`` -> the seeds, in order."""
    seeds = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            seeds += list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise SweepError(f"--seeds {text!r}: give seeds as 100, 200-209 or 1,3,5") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise SweepError(f"--seeds {text!r}: give non-negative seeds, each once")
    return seeds


def points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, the first axis slowest."""
    settings = [{}]
    for field, values in grid.items():
        settings = [{**setting, field: value} for setting in settings for value in values]
    return settings


def setting_name(setting: dict) -> str:
    """A grid point's folder name: ``learning_rate=0.001`` (fields in sorted order, joined by commas)."""
    return ",".join(f"{field}={setting[field]!r}".replace("'", "") for field in sorted(setting))


# ------------------------------------------------------------------------------------------------ running

def _load_config(config_file: str, overrides: list[str]):
    """The config as oat_jax.main would build it (file and overrides), checked; SweepError in one line."""
    from absl import flags
    from ml_collections import config_flags

    from oat_jax.config_schema import ConfigError, unknown_field, validate_config
    if not os.path.isfile(config_file.split(":", 1)[0]):
        raise SweepError(f"config file not found: {config_file}")
    argv = ["sweep", f"--config={config_file}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    try:
        values(argv)
        validate_config(values.config)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    except (AttributeError, KeyError) as e:  # a --grid field, or an override's, that the config lacks
        raise SweepError(f"unknown config field in --grid or a --config.<field> override: {unknown_field(e)}") from None
    except Exception as e:  # noqa: BLE001 - absl and the config file raise many kinds; one line for each
        message = " ".join(str(e).split())
        raise SweepError(f"cannot read {config_file} with {' '.join(overrides) or 'no overrides'}: "
                         f"{message[:300]}") from None
    return values.config


@dataclasses.dataclass(eq=False)  # hashed by identity: a running job keys its process
class Job:
    """One oat_jax.main run of the sweep: its workdir, its command line's overrides, its epochs (all arms and
    seeds), and for a grid point its setting, seed and arms."""
    folder: str
    workdir: str
    arguments: list[str]
    epochs: int
    setting: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    arms: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.relpath(self.workdir, self.folder)

    @property
    def log(self) -> str:
        return os.path.join(self.folder, LOGS_DIR, self.name.replace(os.sep, "__") + ".log")

    def exit_file(self) -> str:
        return self.log[:-len(".log")] + ".exit"

    def finished(self) -> bool:
        """Trained to the end, or ended by its pre-training's divergence (which a rerun would only repeat)."""
        if os.path.exists(os.path.join(self.workdir, workdir_lib.SUMMARY_FILE)):
            return True
        return _exit_status(self.exit_file()) == DIVERGED_EXIT

    def epochs_done(self) -> int:
        if self.finished():
            return self.epochs
        records = workdir_lib.read_records(os.path.join(self.workdir, workdir_lib.METRICS_FILE))
        return len({(r["arm"], r["epoch"], r["seed"]) for r in records})


def _exit_status(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _epochs_of(config) -> int:
    """Epochs a run of ``config`` trains, all arms and seeds together."""
    return config.num_seeds * (config.pretrain_epochs
                               + len(parse_arms(config.arms)) * (config.num_epochs - config.pretrain_epochs))


_STOPPING = []


def run_jobs(jobs: list[Job], config_file: str, parallel: int, prune: bool = False) -> None:
    """Runs the unfinished jobs, ``parallel`` at a time, with a progress line as each ends and every minute.
    A Ctrl-C or SIGTERM is passed on to the runs, which checkpoint and stop; then KeyboardInterrupt. With
    ``prune``, a finished run's checkpoints and TensorBoard events are deleted (a committed study keeps its
    config, metrics and summary only)."""
    waiting = [job for job in jobs if not job.finished()]
    running: dict[Job, subprocess.Popen] = {}
    failures = []
    started, last_line = time.monotonic(), 0.0
    done_before = sum(job.epochs_done() for job in jobs)

    def stop(signum, frame):
        if _STOPPING:
            raise KeyboardInterrupt
        _STOPPING.append(signum)
        for process in running.values():
            process.send_signal(signal.SIGTERM)

    handlers = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (waiting and not _STOPPING):
            while waiting and len(running) < parallel and not _STOPPING:
                job = waiting.pop(0)
                os.makedirs(os.path.dirname(job.log), exist_ok=True)
                with open(job.log, "a") as log:
                    command = ["-m", "oat_jax.main", f"--config={config_file}", f"--workdir={job.workdir}",
                               *job.arguments, "--config.progress=false"]
                    log.write(f"$ python {' '.join(command)}\n")
                    log.flush()
                    # Its own session: a terminal's Ctrl-C reaches it once, through ``stop``.
                    running[job] = subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True)
            time.sleep(0.5)
            for job, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[job]
                with open(job.exit_file(), "w") as f:
                    f.write(f"{process.returncode}\n")
                if prune and process.returncode in (0, DIVERGED_EXIT):
                    _prune(job.workdir)
                if process.returncode not in (0, DIVERGED_EXIT, 130):
                    failures.append(f"{job.name} (exit {process.returncode}: {_last_line(job.log)})")
                last_line = 0.0
            if time.monotonic() - last_line >= 60 and not _STOPPING:
                _progress(jobs, running, started, done_before)
                last_line = time.monotonic()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if _STOPPING:
        _STOPPING.clear()
        raise KeyboardInterrupt
    if failures:
        raise SweepError(f"{len(failures)} run(s) failed: {'; '.join(failures)}; their logs are under "
                         f"{os.path.dirname(jobs[0].log)}")


def _prune(workdir: str) -> None:
    for name in (workdir_lib.CHECKPOINTS_DIR, "tensorboard"):
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, workdir_lib.LOCK_FILE))


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "no output"


def _progress(jobs: list[Job], running: dict, started: float, done_before: int) -> None:
    total = sum(job.epochs for job in jobs)
    done = sum(job.epochs_done() for job in jobs)
    finished = sum(job.finished() for job in jobs)
    rate = (done - done_before) / max(time.monotonic() - started, 1e-9)
    left = f", about {(total - done) / rate / 3600:.1f} h left" if rate > 0 else ""
    names = ", ".join(job.name for job in running) or "none"
    print(f"sweep: {finished} of {len(jobs)} runs finished, {done} of {total} epochs done ({total - done} "
          f"left{left}); running: {names}", flush=True)


# ------------------------------------------------------------------------------------------------ selection

def _point_results(job: Job, setting: dict, seed: int) -> dict[str, dict]:
    """Per arm, what one finished run says about its grid point: validation accuracy at the selected epoch,
    or that it diverged."""
    if not os.path.exists(os.path.join(job.workdir, workdir_lib.SUMMARY_FILE)):  # its pre-training diverged
        return {arm: _entry(job, setting, seed, diverged=True) for arm in job.arms}
    summary = workdir_lib.read_summary(job.workdir)
    results = {}
    for arm, result in summary["arms"].items():
        seeds = [s for s in result["seeds"].values() if "selected_val_accuracy" in s]
        if result.get("diverged") or not seeds:
            results[arm] = _entry(job, setting, seed, diverged=True)
            continue
        results[arm] = _entry(job, setting, seed, diverged=False,
                              validation_accuracy=statistics.fmean(s["selected_val_accuracy"] for s in seeds),
                              selected_epoch=seeds[0]["selected_epoch"])
        results[arm]["selected_on"] = seeds[0].get("selected_on", "val_accuracy")
    return results


# What the stopping rule (and so the choice) read: the balanced figure where the training set is imbalanced.
SCORES = {"val_accuracy": "validation accuracy", "val_balanced_accuracy": "balanced validation accuracy"}


def _entry(job: Job, setting: dict, seed: int, diverged: bool, validation_accuracy=None, selected_epoch=None):
    return {"setting": setting, "seed": seed, "workdir": job.name, "validation_accuracy": validation_accuracy,
            "selected_epoch": selected_epoch, "diverged": diverged}


def choose(entries: list[dict], grid: dict[str, list]) -> dict:
    """One arm's choice among its grid points' ``entries`` (one per point and seed): the point of highest mean
    validation accuracy over its seeds, a tie within ``TIE_POINTS`` going to the lower learning rate (else to
    the earlier point of the grid); a point where a seed diverged is never chosen. ``at_edge`` says whether
    the choice lies at the end of a numeric axis, where a value beyond it might have done better."""
    by_point: dict[str, list[dict]] = {}
    for entry in entries:
        by_point.setdefault(setting_name(entry["setting"]), []).append(entry)
    scores = {name: statistics.fmean(e["validation_accuracy"] for e in group)
              for name, group in by_point.items() if not any(e["diverged"] for e in group)}
    result = {"chosen": None, "at_edge": False, "points": entries}
    if not scores:
        return result
    best = max(scores.values())
    order = [setting_name(setting) for setting in points(grid)]
    tied = [name for name in scores if scores[name] >= best - TIE_POINTS]
    chosen = min(tied, key=lambda name: (by_point[name][0]["setting"].get("learning_rate", 0),
                                         order.index(name) if name in order else len(order)))
    setting = by_point[chosen][0]["setting"]
    result.update(chosen=setting, validation_accuracy=scores[chosen],
                  at_edge=any(isinstance(value, (int, float)) and len(grid[field]) > 1
                              and value in (min(grid[field]), max(grid[field]))
                              for field, value in setting.items()))
    return result


def write_selection(folder: str, jobs: list[Job], grid: dict[str, list]) -> dict:
    """selection.json from the finished jobs: per arm its choice and every point's validation accuracy."""
    entries: dict[str, list[dict]] = {}
    unfinished = []
    for job in jobs:
        if not job.finished():
            unfinished.append(job.name)
            continue
        for arm, entry in _point_results(job, job.setting, job.seed).items():
            entries.setdefault(arm, []).append(entry)
    read = sorted({entry["selected_on"] for group in entries.values() for entry in group if "selected_on" in entry})
    score = " / ".join(SCORES.get(field, field) for field in read) or SCORES["val_accuracy"]
    selection = {"rule": f"highest {score} at the validation-selected epoch; within {TIE_POINTS} points the "
                         "lower learning rate; a diverged point is never chosen; the test set is not read",
                 "score": score, "grid": grid, "complete": not unfinished, "unfinished": unfinished,
                 "arms": {arm: choose(arm_entries, grid) for arm, arm_entries in entries.items()}}
    workdir_lib.write_json(os.path.join(folder, SELECTION_FILE), selection)
    return selection


# ------------------------------------------------------------------------------------------------ commands

def _sweep_jobs(folder: str, config_file: str, grid: dict, seeds: list[int], overrides: list[str]) -> list[Job]:
    jobs = []
    for setting in points(grid):
        arguments = [*overrides, *(f"--config.{field}={value}" for field, value in setting.items())]
        for seed in seeds:
            config = _load_config(config_file, [*arguments, f"--config.seed={seed}"])
            if not config.validation_size:
                raise SweepError("a sweep chooses on validation accuracy, and this config holds out none; set "
                                 "--config.validation_size (e.g. 0.1)")
            jobs.append(Job(folder, os.path.join(folder, setting_name(setting), f"seed_{seed}"),
                            [*arguments, f"--config.seed={seed}"], _epochs_of(config), setting, seed,
                            parse_arms(config.arms)))
    return jobs


def _record_sweep(folder: str, record: dict) -> dict:
    """sweep.json: the config file, the overrides and the grid, so that a rerun and ``confirm`` repeat them. A
    rerun may add grid values (a point beyond an edge, say); another config file or other overrides are
    refused."""
    path = os.path.join(folder, SWEEP_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for key in ("config", "overrides"):
            if saved[key] != record[key]:
                raise SweepError(f"{folder} holds a sweep with {key} {saved[key]!r}, not {record[key]!r}; rerun "
                                 "with the same, or pass another --out")
        for field, values in record["grid"].items():
            known = saved["grid"].setdefault(field, [])
            known += [value for value in values if value not in known]
        saved["seeds"] = sorted(set(saved["seeds"]) | set(record["seeds"]))
        record = saved
    problem = workdir_lib.unwritable(folder)
    if problem:
        raise SweepError(f"cannot write the sweep to {folder}: {problem}")
    workdir_lib.write_json(path, record)
    return record


def edge_extensions(selection: dict, grid: dict[str, list]) -> dict[str, list]:
    """Per numeric axis, the value one geometric step beyond each end of the grid where some arm's choice
    sits (3e-2 after 1e-2, 3e-2 gives 9e-2), rounded to three significant digits."""
    extra: dict[str, list] = {}
    for choice in selection["arms"].values():
        for field, value in (choice["chosen"] or {}).items():
            values = sorted(v for v in grid.get(field, []) if isinstance(v, (int, float)))
            if len(values) < 2 or value not in (values[0], values[-1]) or 0 in values[:2] + values[-2:]:
                continue
            beyond = values[-1] ** 2 / values[-2] if value == values[-1] else values[0] ** 2 / values[1]
            beyond = float(f"{beyond:.3g}")
            if beyond not in values and beyond not in extra.get(field, []):
                extra.setdefault(field, []).append(beyond)
    return extra


def sweep(args, overrides: list[str]) -> dict:
    """Runs every point of the folder's grid (this command's, and what earlier ones or an edge added), writes
    the selection; with ``extend_edges``, once per folder, adds one point beyond each edge where an arm's
    choice sits, runs it and chooses again."""
    grid, seeds = parse_grid(args.grid), parse_seeds(args.seeds)
    _sweep_jobs(args.out, args.config, grid, seeds, overrides)  # every run's config checked before anything is written
    record = _record_sweep(args.out, {"config": args.config, "overrides": overrides, "grid": grid,
                                      "seeds": sorted(set(seeds))})
    while True:
        jobs = _sweep_jobs(args.out, args.config, record["grid"], record["seeds"], overrides)
        run_jobs(jobs, args.config, args.parallel, args.prune)
        selection = write_selection(args.out, jobs, record["grid"])
        if not args.extend_edges or "edges_extended" in record or not selection["complete"]:
            return selection
        # Recorded before its runs start: an interrupted extension resumes with the same points.
        record["edges_extended"] = edge_extensions(selection, record["grid"])
        for field, values in record["edges_extended"].items():
            record["grid"][field] = record["grid"][field] + values
        workdir_lib.write_json(os.path.join(args.out, SWEEP_FILE), record)
        if not record["edges_extended"]:
            return selection
        beyond = [f"{field}={value:g}" for field, values in record["edges_extended"].items() for value in values]
        print(f"sweep: a choice sits at the grid's edge; one more point beyond it: {', '.join(beyond)}", flush=True)


def confirm(args, overrides: list[str]) -> list[str]:
    """Trains each arm at its chosen point on ``--seeds``; arms with the same choice share a run."""
    try:
        with open(os.path.join(args.folder, SWEEP_FILE)) as f:
            record = json.load(f)
        with open(os.path.join(args.folder, SELECTION_FILE)) as f:
            selection = json.load(f)
    except (OSError, ValueError):
        raise SweepError(f"{args.folder} holds no finished sweep (sweep.json and selection.json); run "
                         "python -m oat_jax.sweep --config ... --grid ... --out there first") from None
    if not selection["complete"]:
        raise SweepError(f"the sweep in {args.folder} is unfinished ({', '.join(selection['unfinished'])}); "
                         "rerun it to the end before confirming")
    groups: dict[str, list[str]] = {}
    for arm, choice in selection["arms"].items():
        if choice["chosen"] is None:
            print(f"confirm: arm {arm} diverged at every grid point; it is left out", file=sys.stderr)
            continue
        groups.setdefault(setting_name(choice["chosen"]), []).append(arm)
    jobs = []
    for name, arms in groups.items():
        setting = next(selection["arms"][arm]["chosen"] for arm in arms)
        arguments = [*record["overrides"], *overrides,
                     *(f"--config.{field}={value}" for field, value in setting.items()),
                     f"--config.arms={','.join(arms)}"]
        for seed in parse_seeds(args.seeds):
            config = _load_config(record["config"], [*arguments, f"--config.seed={seed}"])
            jobs.append(Job(args.folder, os.path.join(args.folder, CONFIRM_DIR, name, f"seed_{seed}"),
                            [*arguments, f"--config.seed={seed}"], _epochs_of(config)))
    run_jobs(jobs, record["config"], args.parallel, args.prune)
    return [job.workdir for job in jobs]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oat_jax.sweep", description=__doc__.split("\n\n")[0],
        epilog="Any --config.<field>=<value> is passed to every run, as oat_jax.main takes it.")
    parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                        help="a config field and its values; several --grid make a product")
    parser.add_argument("--seeds", default="0", help="seeds of every grid point: 100, 200-209 or 1,3,5")
    parser.add_argument("--out", required=True, help="the sweep's folder")
    _running_options(parser)
    parser.add_argument("--extend-edges", action="store_true",
                        help="once the grid is done, add one point beyond each edge where an arm's choice sits "
                             "(once per folder) and choose again")
    return parser


def _running_options(parser: argparse.ArgumentParser) -> None:
    """How the runs of a sweep and of its confirmation are run."""
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, help="runs side by side")
    parser.add_argument("--prune", action="store_true",
                        help="delete each finished run's checkpoints and TensorBoard events")


def _confirm_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oat_jax.sweep confirm",
        description="Trains each arm at its chosen grid point (selection.json) on fresh seeds.")
    parser.add_argument("folder", help="a finished sweep's folder")
    parser.add_argument("--seeds", required=True, help="the fresh seeds: 200-209 or 1,3,5")
    _running_options(parser)
    return parser


def main(argv: list[str]) -> int:
    overrides = [arg for arg in argv if arg.startswith("--config.")]
    rest = [arg for arg in argv if not arg.startswith("--config.")]
    try:
        confirming = rest[:1] == ["confirm"]
        args = _confirm_parser().parse_args(rest[1:]) if confirming else _parser().parse_args(rest)
        if args.parallel < 1:
            raise SweepError(f"--parallel must be at least 1, got {args.parallel}")
        if confirming:
            workdirs = confirm(args, overrides)
            print(f"confirmed: {len(workdirs)} runs under {os.path.join(args.folder, CONFIRM_DIR)}; report them "
                  f"with python -m oat_jax.report {os.path.join(args.folder, CONFIRM_DIR)}/*/seed_* "
                  f"--sweep {args.folder}")
            return 0
        selection = sweep(args, overrides)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every run saved its progress: rerun the same command to resume", file=sys.stderr)
        return 130
    for arm, choice in selection["arms"].items():
        chosen = "none (diverged everywhere)" if choice["chosen"] is None else (
            f"{setting_name(choice['chosen'])}, {selection['score']} {choice['validation_accuracy']:.2f}%"
            + (" (at the grid's edge)" if choice["at_edge"] else ""))
        print(f"{arm:<15} {chosen}")
    if not selection["complete"]:
        print(f"unfinished: {', '.join(selection['unfinished'])}")
    print(f"selection written to {os.path.join(args.out, SELECTION_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
