"""A run's workdir: the one module that knows its files, and its lock (one run per workdir at a time).

The files: ``config.json`` (the run's configuration without its cosmetic fields), ``metrics.jsonl`` (one JSON
line per arm, epoch and seed), ``summary.json`` (each arm's final and best test accuracy), ``checkpoints/``.
Every JSON file is written atomically; ``read_config`` is the one reader of config.json. Nothing here imports
JAX (the report and the plots stay light). A run stopped before its first epoch puts the workdir back as it
found it (``as_found``, ``put_back``).

``hold_lock`` takes an OS advisory lock (``flock``) on ``<workdir>/.lock`` and writes the holder (process id,
host, start time) into it. The kernel drops the lock when its holder ends, however it ends (``kill -9``
included), so a lock left by a dead run is stale by construction and the next run simply takes it. The file
itself stays after the run: whether it is locked, not whether it exists, is what counts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
import warnings

from oat_jax.disk_full import writing
from oat_jax.names import CE, PRETRAIN

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"
# A metrics.jsonl line with this "event" ends its arm: the arm diverged (at "epoch" and "step") for that seed.
DIVERGED = "diverged"


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir's lock; the message names its process."""


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (it may be a moment before the holder has written it)."""
    for _ in range(10):
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "a process that has not said who it is"


@contextlib.contextmanager
def hold_lock(workdir: str):
    """Holds ``workdir``'s lock for the block (making the folder); WorkdirBusy when another run holds it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by programs this one starts
    try:
        locked = _try_lock(fd, path)
        if locked is False:
            raise WorkdirBusy(f"workdir {workdir} is in use by another run ({_holder(fd)}); wait for it to "
                              "finish or stop it, or pass another --workdir")
        if locked:
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            holder = f"process {os.getpid()} on host {socket.gethostname()}, started {started}\n"
            with writing(path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode(), 0)
        try:
            yield
        finally:
            if locked:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # no stale holder for the next reader to name; the flock alone counts
                    fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _try_lock(fd: int, path: str) -> bool | None:
    """True when locked, False when another holds the lock, None when this file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        # Some network or FUSE mounts: run, but unguarded.
        warnings.warn(f"cannot lock {path} ({error.strerror}); nothing stops a second run on this workdir at once")
        return None


# Config fields that may differ between a run and its resumption without changing its results.
# fused_epoch: the same steps on the same batches either way, as on another number of devices.
COSMETIC_FIELDS = ("progress", "distributed", "steps_in_flight", "stall_timeout_seconds", "fused_epoch",
                   "compilation_cache")


class WorkdirError(ValueError):
    """A workdir file that is missing or unreadable; the one-line message names it (relative to the workdir)."""


class WorkdirMismatch(RuntimeError):
    """The workdir holds a run made with another configuration."""


@contextlib.contextmanager
def replacing(path: str):
    """Yields a temporary path for ``path``'s new content, which replaces ``path`` when the block ends: a
    reader never sees half a file. A full disk is ``WorkdirFull`` naming ``path``."""
    tmp = path + ".tmp"
    with writing(path):
        yield tmp
    os.replace(tmp, path)


def unwritable(folder: str) -> str | None:
    """Makes ``folder`` where it is missing; why files cannot be written there, or None where they can (the
    report's and the figures' outputs, checked before the work)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # a trial file: permission bits do not bind root
            return None
    except OSError as e:
        return e.strerror or str(e)


def write_json(path: str, value: dict) -> None:
    """Writes ``value`` as indented JSON, atomically."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(workdir: str, name: str, missing: str) -> dict:
    """The JSON object in ``<workdir>/<name>``; WorkdirError with the message ``missing`` when there is none,
    or naming the file when it is not a JSON object."""
    try:
        with open(os.path.join(workdir, name)) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise WorkdirError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise WorkdirError(f"{name} is not a JSON object")
    return value


def identity(config: dict) -> dict:
    """The fields that decide a run's results (of a config's ``to_dict()`` or a saved config.json): all but
    the cosmetic ones, the arms without spaces ("ce, oat" = "ce,oat")."""
    fields = {k: v for k, v in config.items() if k not in COSMETIC_FIELDS}
    if "arms" in fields:
        fields["arms"] = ",".join(name.strip() for name in fields["arms"].split(",") if name.strip())
    return fields


def read_config(workdir: str) -> dict:
    """The run's config.json; WorkdirError when there is no readable one."""
    return read_json(workdir, CONFIG_FILE, f"{CONFIG_FILE} is missing: is this an oat_jax workdir?")


def check_config(workdir: str, config: dict) -> None:
    """Refuses (WorkdirMismatch) a workdir holding a run (checkpoints or metrics) made with another config
    than ``config`` (a ``to_dict()``). Reads only."""
    trained = any(os.path.exists(os.path.join(workdir, name)) for name in (CHECKPOINTS_DIR, METRICS_FILE))
    if not (trained and os.path.exists(os.path.join(workdir, CONFIG_FILE))):
        return  # nothing trained here yet: the new config takes the folder
    try:
        saved, current = identity(read_config(workdir)), identity(config)
    except WorkdirError as e:
        raise WorkdirMismatch(f"workdir {workdir} holds a run whose {e}; pass a new --workdir to start fresh") from None
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        fields = ", ".join(f"{k} (recorded {_short(saved.get(k))}, now {_short(current.get(k))})" for k in changed)
        raise WorkdirMismatch(
            f"workdir {workdir} holds a run with a different config (fields: {fields}); "
            f"rerun with the same config to resume it, or pass a new --workdir to start fresh")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def record_config(workdir: str, config: dict) -> None:
    """Writes ``config`` (a ``to_dict()``) without its cosmetic fields to config.json; the record of the same
    run (a resumed one's) is left as it was."""
    record = {k: v for k, v in config.items() if k not in COSMETIC_FIELDS}
    with contextlib.suppress(WorkdirError):
        if identity(read_json(workdir, CONFIG_FILE, "")) == identity(record):
            return
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, CONFIG_FILE), record)


def read_summary(workdir: str) -> dict:
    """The run's summary.json; WorkdirError when it has none (unfinished or refused) or it is unreadable."""
    return read_json(workdir, SUMMARY_FILE, f"no {SUMMARY_FILE} (an unfinished or refused run)")


def as_found(workdir: str):
    """What ``put_back`` needs to restore ``workdir`` as found now: None when it holds a run (checkpoints or
    metrics, which a stop leaves to resume), else (the nearest folder of its path that exists, the names in it
    when that is the workdir, the bytes of a config.json there)."""
    path = os.path.abspath(workdir)
    if any(os.path.lexists(os.path.join(path, name)) for name in (CHECKPOINTS_DIR, METRICS_FILE)):
        return None
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if existing != path:
        return existing, set(), None
    if not os.path.isdir(path):
        return None  # not a folder: the run is refused before it writes
    config, saved = os.path.join(path, CONFIG_FILE), None
    if os.path.isfile(config):
        with open(config, "rb") as f:
            saved = f.read()
    return existing, set(os.listdir(path)), saved


def put_back(workdir: str, found) -> None:
    """Removes what a run wrote in ``workdir`` since ``as_found`` saw it: the folders it made (up to the
    nearest that existed), or in a folder that was there, the entries it added and config.json as it was."""
    path = os.path.abspath(workdir)
    existing, names, config = found
    if existing != path:
        shutil.rmtree(path, ignore_errors=True)
        folder = os.path.dirname(path)
        with contextlib.suppress(OSError):  # the folders above it that the run made, while empty
            while folder != existing:
                os.rmdir(folder)
                folder = os.path.dirname(folder)
        return
    for name in set(os.listdir(path)) - names:
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(entry)
    if config is not None:
        with replacing(os.path.join(path, CONFIG_FILE)) as tmp, open(tmp, "wb") as f:
            f.write(config)


class MetricsLog:
    """A run's metrics.jsonl: append-only JSON lines, cut back on resume to the epochs that have a checkpoint.
    Its lines are epochs (``records``) and the events that ended an arm early (``divergences``).
    With ``write=False`` (the other processes of a run over several) the same records are kept in memory
    only. A ``mirror`` (the TensorBoard events) gets every appended record too."""

    def __init__(self, path: str, write: bool = True):
        self.path = path
        self.write = write
        self.mirror = None
        self._records = read_lines(path)

    def records(self) -> list[dict]:
        """The epochs' lines."""
        return [r for r in self._records if "event" not in r]

    def divergences(self) -> list[dict]:
        return [r for r in self._records if r.get("event") == DIVERGED]

    def keep_only(self, last_epoch_of_arm: dict[str, int]) -> None:
        """Drops lines of epochs after each arm's last checkpoint (those epochs will be trained again), and
        an arm's divergence unless it follows that checkpoint's epoch."""
        self._records = [r for r in self._records
                         if r["epoch"] <= last_epoch_of_arm.get(r["arm"], 0) + ("event" in r)]
        if self.write:
            with replacing(self.path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self._records)

    def append(self, record: dict) -> None:
        self._records.append(record)
        if self.write:
            with writing(self.path), open(self.path, "a") as f:  # a line cut short by a full disk is redone
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.mirror is not None and "event" not in record:
            self.mirror.add(record)
            self.mirror.flush()


def read_records(path: str) -> list[dict]:
    """The epochs' lines of a metrics.jsonl file ([] when there is none)."""
    return [r for r in read_lines(path) if "event" not in r]


def read_lines(path: str) -> list[dict]:
    """The lines of a metrics.jsonl file ([] when there is none), up to one cut short by a kill (its epoch
    is redone)."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


# How a seed's score is read off its epochs: at the epoch of highest validation accuracy, or at the last.
SELECT_VALIDATION, SELECT_FINAL = "validation", "final"
SCORE_FIELDS = {SELECT_VALIDATION: "test_accuracy_at_selected_epoch", SELECT_FINAL: "final_test_accuracy"}
# Scores besides the plain test accuracy (``scores``' ``metric``): the mean of the classes' accuracies, and the
# mean over the least frequent third of the training classes; each from the record field beside it.
METRICS = {"balanced": "test_balanced_accuracy", "few": "test_accuracy_few"}


def score_field(rule: str, metric: str = "") -> str:
    """The seed summary's field of ``metric`` ("" = test accuracy, or a key of METRICS) under ``rule``."""
    return SCORE_FIELDS[rule] if not metric else (f"final_{metric}_test_accuracy" if rule == SELECT_FINAL
                                                 else f"{metric}_test_accuracy_at_selected_epoch")


def _arm_summary(history: list[dict], select_on: str = "val_accuracy") -> dict:
    """One seed's figures. The oracle's best epoch is picked by test accuracy: it is shown, never compared.
    With a validation split, ``selected_epoch`` is the epoch of highest ``select_on`` (validation accuracy, or
    balanced accuracy on an imbalanced training set; the earlier epoch on a tie), and
    ``test_accuracy_at_selected_epoch`` its test accuracy."""
    best = max(history, key=lambda r: (r["test_accuracy"], -r["epoch"]))
    result = {"final_test_accuracy": history[-1]["test_accuracy"], "final_epoch": history[-1]["epoch"],
              "oracle_best_test_accuracy": best["test_accuracy"], "oracle_best_epoch": best["epoch"]}
    result.update({score_field(SELECT_FINAL, metric): history[-1][field] for metric, field in METRICS.items()
                   if history[-1].get(field) is not None})
    validated = [r for r in history if select_on in r]
    if validated:
        selected = max(validated, key=lambda r: (r[select_on], -r["epoch"]))
        result.update(selected_epoch=selected["epoch"], selected_on=select_on,
                      selected_val_accuracy=selected[select_on],
                      test_accuracy_at_selected_epoch=selected["test_accuracy"],
                      final_val_accuracy=history[-1].get(select_on))
        result.update({score_field(SELECT_VALIDATION, metric): selected[field] for metric, field in METRICS.items()
                       if selected.get(field) is not None})
    if "test_accuracy_by_decode" in history[-1]:  # runs from before the four decodings lack it
        result["final_test_accuracy_by_decode"] = history[-1]["test_accuracy_by_decode"]
    return result


def oracle_named(figures: dict) -> dict:
    """An arm's or a seed's summary entry with the oracle fields under their present names (summaries written
    before the validation split called them ``best_test_accuracy``, ``best_epoch``)."""
    return {("oracle_" + key if key.startswith("best_") else key): value for key, value in figures.items()}


def selection_rule(*groups: dict) -> str:
    """The comparison's rule for groups of seed entries ({seed: entry}): the validation-selected epoch where
    every seed of every group has one, otherwise the final epoch."""
    entries = [entry for group in groups for entry in group.values()]
    return SELECT_VALIDATION if entries and all(SCORE_FIELDS[SELECT_VALIDATION] in e for e in entries) \
        else SELECT_FINAL


def summarise(records: list[dict], arms: list[str], paper: dict, divergences: list[dict] = (),
              select_on: str = "val_accuracy") -> dict:
    """Each arm's final and best test accuracy (%), per seed and as mean and standard deviation over seeds;
    and each arm against cross-entropy, paired by seed (``vs_ce``, ``oat_jax.paired``).

    The arm CE continues the shared pre-training, so its history is the pre-training epochs followed
    by its own; every other arm's (OAT's, say) is its own epochs only. An arm that diverged (``divergences``,
    metrics.jsonl's DIVERGED lines) says where under ``diverged`` ({seed: {"epoch", "step", and
    "last_good_epoch" where it had one}}); a seed cut short is left out of ``seeds``, so it is never shown as
    final nor paired. An arm with no epoch and no divergence is left out.
    """
    from oat_jax.paired import paired_comparison
    summary = {"arms": {}, "paper": paper if paper.get("table") else None}
    for arm in arms:
        phases = (arm, PRETRAIN) if arm == CE else (arm,)
        per_seed = {}
        for seed in sorted({r["seed"] for r in records}):
            history = sorted((r for r in records if r["seed"] == seed and r["arm"] in phases), key=lambda r: r["epoch"])
            if history:
                per_seed[str(seed)] = _arm_summary(history, select_on)
        diverged = {str(event["seed"]): {"epoch": event["epoch"], "step": event["step"]}
                    for event in divergences if event["arm"] == arm}
        for seed, where in diverged.items():  # cut short: never shown as final, never paired
            if seed in per_seed:
                where["last_good_epoch"] = per_seed.pop(seed)["final_epoch"]
        if not per_seed and not diverged:
            continue
        result = {"seeds": per_seed}
        if diverged:
            result["diverged"] = diverged
        if not per_seed:
            result["final_epoch"] = min(event["epoch"] for event in diverged.values()) - 1
            summary["arms"][arm] = result
            continue
        result["final_epoch"] = max(s["final_epoch"] for s in per_seed.values())
        for key in ("final_test_accuracy", "test_accuracy_at_selected_epoch", "oracle_best_test_accuracy",
                    *(score_field(rule, metric) for metric in METRICS for rule in SCORE_FIELDS)):
            values = [s[key] for s in per_seed.values() if key in s]
            if len(values) < len(per_seed):
                continue
            result[key] = statistics.fmean(values)
            result[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        by_decode = [s["final_test_accuracy_by_decode"] for s in per_seed.values()
                     if "final_test_accuracy_by_decode" in s]
        if len(by_decode) == len(per_seed):
            result["final_test_accuracy_by_decode"] = {name: statistics.fmean(d[name] for d in by_decode)
                                                       for name in by_decode[0]}
        if len(per_seed) == 1:
            only = next(iter(per_seed.values()))
            result.update({key: only[key] for key in ("oracle_best_epoch", "selected_epoch") if key in only})
        summary["arms"][arm] = result
    reference = summary["arms"].get(CE, {}).get("seeds", {})
    for arm, result in summary["arms"].items():
        if arm != CE and reference:
            rule = selection_rule(result["seeds"], reference)
            comparison = paired_comparison(scores(result["seeds"], rule), scores(reference, rule))
            if comparison:
                result["vs_ce"] = {**comparison, "select": rule}
    return summary


def scores(per_seed: dict, rule: str, metric: str = "") -> dict[str, float]:
    """Each seed's test accuracy (or ``metric``, a key of METRICS) under ``rule`` (``SELECT_VALIDATION`` or
    ``SELECT_FINAL``)."""
    field = score_field(rule, metric)
    return {seed: s[field] for seed, s in per_seed.items() if field in s}
