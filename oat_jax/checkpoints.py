"""Orbax checkpoints of one training arm, ``<workdir>/checkpoints/<arm>/<optimiser step>``.

Orbax renames a checkpoint into place once complete, so a killed run leaves only whole ones. A checkpoint that
cannot be read is set aside; one that does not fit the state (another model or version) raises
``CheckpointMismatch`` and stays. A full disk raises ``disk_full.WorkdirFull``. With several processes each
calls the same methods (Orbax coordinates); process 0 alone moves folders.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from oat_jax import distributed, sharding
from oat_jax.disk_full import WorkdirFull, is_disk_full, writing


class CheckpointMismatch(RuntimeError):
    """A checkpoint whose saved arrays differ from the state's in structure, shape or dtype."""


_SAVE_FAILED = threading.Event()  # set once a save met a full disk: what Orbax's threads say after is noise


def _quiet_closed_loop(unraisable, hook):
    # Tensorstore writes of a failed save that end after Orbax closed its event loop report only that.
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        hook(unraisable)


@contextlib.contextmanager
def quiet_checkpoint_noise():
    """For the block (a run), the tracebacks that Orbax's threads (through absl), asyncio and tensorstore print
    of a failed save, besides the error the caller gets, are not printed; the filters and hook are put back."""
    def quiet(record):
        return not (record.exc_info and (_SAVE_FAILED.is_set() or is_disk_full(record.exc_info[1])))
    hook, loggers = sys.unraisablehook, [logging.getLogger(name) for name in ("absl", "asyncio")]
    for logger in loggers:
        logger.addFilter(quiet)
    sys.unraisablehook = functools.partial(_quiet_closed_loop, hook=hook)
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for logger in loggers:
            logger.removeFilter(quiet)
            # A failed save's orphaned asyncio future reports its full-disk error when it is collected, which
            # can be after this block: that report stays quiet for the process, every other one prints.
            logger.addFilter(_not_disk_full)


def _not_disk_full(record) -> bool:
    return not (record.exc_info and is_disk_full(record.exc_info[1]))


@contextlib.contextmanager
def _saving(path: str):
    """A full disk during an Orbax save raises WorkdirFull naming ``path``."""
    try:
        with writing(path):
            yield
    except WorkdirFull:
        _SAVE_FAILED.set()
        raise


class ResumePoint(NamedTuple):
    """Where an arm resumes: after ``epoch`` epochs and ``steps_done`` steps of the next, with the states and,
    part-way, that epoch's running metrics."""
    epoch: int
    steps_done: int
    states: object
    metrics: dict | None


class ArmCheckpoints:
    """One arm's checkpoints in an Orbax manager: each holds the replicas' ``state`` and, for an epoch stopped
    part-way, its running metrics as ``progress``; the custom metadata {"epoch": e, "steps_done": s or None}
    says where it stands. Two are kept, so one survives while the next is written. A finished epoch is saved
    in the background while the next trains; ``close`` and every restore wait for it."""

    def __init__(self, workdir: str, arm: str, max_to_keep: int = 2):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints", arm)
        self.arm = arm
        self._in_flight: str | None = None  # the folder of a save still being written in the background
        handler = ocp.StandardCheckpointHandler
        with writing(self.directory):
            self._manager = ocp.CheckpointManager(
                self.directory, item_handlers={"state": handler(), "progress": handler()},
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                     enable_async_checkpointing=True))

    def _point(self, step: int) -> tuple[int, int | None] | None:
        """(epoch, steps done part-way or None) of a saved step; None when its metadata cannot be read."""
        try:
            saved = self._manager.metadata(step).custom_metadata
            return saved["epoch"], saved["steps_done"]
        except Exception:  # as in restore_latest
            return None

    def latest_epoch(self) -> int | None:
        """The last finished epoch with a checkpoint, None without one."""
        self.wait()
        points = [self._point(step) for step in self._manager.all_steps()]
        return max((point[0] for point in points if point and point[1] is None), default=None)

    def save(self, epoch: int, states, steps_done: int | None = None, metrics: dict | None = None) -> None:
        """Saves the end of ``epoch`` in the background, or with ``steps_done`` and ``metrics`` its progress
        part-way (and waits: the run is stopping)."""
        step = int(np.asarray(sharding.to_host(states.step)).reshape(-1)[0])
        items = {"state": ocp.args.StandardSave(states)}
        if steps_done is not None:
            items["progress"] = ocp.args.StandardSave(metrics)
        self.wait()  # a failed background save raises here
        self._in_flight = os.path.join(self.directory, str(step))
        with _saving(self._in_flight):
            self._manager.save(step, args=ocp.args.Composite(**items),
                               custom_metadata={"epoch": epoch, "steps_done": steps_done})
        if steps_done is not None:
            self.wait()

    def wait(self) -> None:
        """Returns once a save in flight is on disk (WorkdirFull naming it when the disk filled)."""
        with _saving(self._in_flight or self.directory):
            self._manager.wait_until_finished()
        self._in_flight = None

    def _restore(self, step: int, template, with_progress: bool):
        _check_fits(os.path.join(self.directory, str(step)), lambda: self._manager.item_metadata(step)["state"],
                    template)
        items = {"state": ocp.args.StandardRestore(template)}
        if with_progress:
            items["progress"] = ocp.args.StandardRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["progress"] if with_progress else None

    def restore(self, epoch: int, template):
        """The states saved at the end of ``epoch``, in ``template``'s structure (CheckpointMismatch if unfit)."""
        self.wait()
        step = next(step for step in self._manager.all_steps() if self._point(step) == (epoch, None))
        return self._restore(step, template, with_progress=False)[0]

    def restore_latest(self, template, warn, at_most: int | None = None) -> ResumePoint | None:
        """The latest checkpoint that restores, or None. One that does not is moved to ``checkpoints/corrupt/``
        with a ``warn``ing, and the previous one tried. Checkpoints past epoch ``at_most`` (the last one
        metrics.jsonl records) are removed with a warning, so that the log and the checkpoints agree."""
        self.wait()
        for step in sorted(self._manager.all_steps(), reverse=True):
            epoch, part = self._point(step) or (None, None)
            path = os.path.join(self.directory, str(step))
            if epoch is not None and at_most is not None and (epoch > at_most if part is None else epoch > at_most + 1):
                self._manager.delete(step)
                warn(f"checkpoint {path} is ahead of metrics.jsonl (the line of {self.arm} epoch {epoch} is "
                     "missing or cut short); removed, and its epoch is trained again")
                continue
            try:
                if epoch is None:
                    raise ValueError("its metadata cannot be read")
                states, metrics = self._restore(step, template, with_progress=part is not None)
            except CheckpointMismatch:
                raise
            except Exception as error:  # Orbax and tensorstore raise many kinds (mostly ValueError) for damage
                moved = _set_aside(path, os.path.dirname(self.directory), f"{self.arm}-step{step}")
                distributed.barrier(f"oat_jax:set-aside-{self.arm}-{step}")
                self._manager.reload()
                warn(f"checkpoint {path} cannot be restored ({type(error).__name__}: {_first_line(error)}); "
                     f"moved to {moved}, going back to the previous checkpoint")
                continue
            return ResumePoint(epoch, 0, states, None) if part is None else ResumePoint(epoch - 1, part, states,
                                                                                          metrics)
        return None

    def close(self) -> None:
        self.wait()
        self._manager.close()


def _check_fits(path: str, read_metadata, template) -> None:
    """CheckpointMismatch when the arrays saved at ``path`` (their metadata) differ from ``template``'s in tree
    paths, shapes or dtypes; unreadable metadata is left to the restore to judge."""
    try:
        saved = _shapes(read_metadata().tree)
    except Exception:  # damaged, or absent (None has no .tree)
        return
    expected = _shapes(template)
    differences = [f"{key}: saved {saved.get(key, 'nothing')}, expected {expected.get(key, 'nothing')}"
                   for key in [*expected, *(key for key in saved if key not in expected)]
                   if saved.get(key) != expected.get(key)]
    if differences:
        more = f" and {len(differences) - 2} more" if len(differences) > 2 else ""
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit this run's state ({'; '.join(differences[:2])}{more}): the workdir "
            "was made by another version or config of oat_jax; use a new --workdir, or the version that made it")


def _shapes(tree) -> dict:
    """{"params/head/bias": "(1, 64, 10) float32"}: the same names for a state and for Orbax's metadata of it."""
    return {jax.tree_util.keystr(path, simple=True, separator="/"): f"{tuple(leaf.shape)} {leaf.dtype}"
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _set_aside(path: str, checkpoints: str, name: str) -> str:
    """Moves a damaged checkpoint to ``<checkpoints>/corrupt/<name>[-k]`` (process 0); returns where."""
    if not distributed.is_primary():
        return os.path.join(checkpoints, "corrupt", name)
    corrupt = os.path.join(checkpoints, "corrupt")
    os.makedirs(corrupt, exist_ok=True)
    target, k = os.path.join(corrupt, name), 1
    while os.path.exists(target):
        k += 1
        target = os.path.join(corrupt, f"{name}-{k}")
    os.rename(path, target)
    return target
