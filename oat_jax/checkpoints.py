"""Orbax checkpoints of one training arm: ``<workdir>/checkpoints/<arm>/<epoch>``.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed at any
moment leaves only whole checkpoints behind; the latest one is where a rerun resumes. With several processes
every one calls the same methods (Orbax coordinates the writing); process 0 alone moves or removes folders.

A checkpoint that cannot be read (truncated, corrupt) is set aside; one whose saved arrays do not fit the state
being restored (another model, number of classes or version of this code) raises ``CheckpointMismatch`` and
stays where it is. Saving on a full disk raises ``disk_full.WorkdirFull``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading

import jax
import orbax.checkpoint as ocp

from oat_jax import distributed
from oat_jax.disk_full import WorkdirFull, is_disk_full, writing


class CheckpointMismatch(RuntimeError):
    """A checkpoint whose saved arrays differ from the state to restore in structure, shape or dtype: the
    workdir was made by another version or config. Nothing is moved."""


# Set once a save met a full disk: the run ends with one line (WorkdirFull), and what Orbax's threads still
# log about the abandoned save is noise.
_SAVE_FAILED = threading.Event()


class _QuietAfterFullDisk(logging.Filter):
    """Orbax's writer threads (through absl) and asyncio log a failed save's error with its traceback while the
    save raises the same error in the caller, and after a full disk the threads still busy with the abandoned
    save log more: none of that is printed."""

    def filter(self, record):
        return not (record.exc_info and (_SAVE_FAILED.is_set() or is_disk_full(record.exc_info[1])))


def _quiet_closed_loop(unraisable, hook=sys.unraisablehook):
    """Tensorstore writes of a failed save that finish after Orbax closed its event loop report the closed loop
    as an 'unraisable' RuntimeError with a traceback, which says nothing about the checkpoint: not printed."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        hook(unraisable)


for _logger in ("absl", "asyncio"):
    logging.getLogger(_logger).addFilter(_QuietAfterFullDisk())
sys.unraisablehook = _quiet_closed_loop


@contextlib.contextmanager
def _saving(path: str):
    """A full disk during an Orbax save raises WorkdirFull naming ``path``."""
    try:
        with writing(path):
            yield
    except WorkdirFull:
        _SAVE_FAILED.set()
        raise


class ArmCheckpoints:
    """The latest states of one arm ("pretrain", "ce" or "oat"), one per finished epoch (step = epoch)."""

    def __init__(self, workdir: str, arm: str, max_to_keep: int = 2):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints", arm)
        self.arm = arm
        self.partial = PartialEpochs(workdir, arm)  # an epoch of this arm stopped part-way
        # Two are kept so that the previous epoch survives while the next one is being written. Saving is
        # synchronous: the states are small (a tenth of a second here), and an epoch's checkpoint is then
        # complete on disk before the next epoch starts, with no background threads competing for the CPU.
        with writing(self.directory):
            self._manager = ocp.CheckpointManager(
                self.directory, item_handlers=ocp.StandardCheckpointHandler(),  # for item_metadata
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                     enable_async_checkpointing=False))

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def save(self, epoch: int, state) -> None:
        with _saving(os.path.join(self.directory, str(epoch))):
            self._manager.save(epoch, args=ocp.args.StandardSave(state))

    def restore(self, epoch: int, template):
        """The state saved at ``epoch``, with the structure (and static fields) of ``template``; raises
        CheckpointMismatch when the saved arrays do not fit ``template``."""
        _check_fits(os.path.join(self.directory, str(epoch)), lambda: self._manager.item_metadata(epoch), template)
        return self._manager.restore(epoch, args=ocp.args.StandardRestore(template))

    def restore_latest(self, template, warn, at_most: int | None = None) -> tuple[int | None, object]:
        """(epoch, state) of the latest checkpoint that restores, or (None, None). A checkpoint that does not
        (truncated, corrupt) is moved aside to ``checkpoints/corrupt/``, never deleted, and ``warn`` is
        called with a line naming it; the previous one is tried next. CheckpointMismatch is raised as is.

        Checkpoints after epoch ``at_most`` (the last one metrics.jsonl records) are removed with a warning:
        their epochs are trained again, exactly, so that the log and the checkpoints agree."""
        for epoch in sorted(self._manager.all_steps(), reverse=True):
            if at_most is not None and epoch > at_most:
                self._manager.delete(epoch)
                warn(f"checkpoint {os.path.join(self.directory, str(epoch))} is ahead of metrics.jsonl (the line "
                     f"of {self.arm} epoch {epoch} is missing or cut short); removed, and its epoch is trained again")
                continue
            try:
                return epoch, self.restore(epoch, template)
            except CheckpointMismatch:
                raise
            except Exception as error:  # Orbax and tensorstore raise many kinds (mostly ValueError) for damage
                moved = _set_aside(os.path.join(self.directory, str(epoch)), os.path.dirname(self.directory),
                                   f"{self.arm}-epoch{epoch}")
                distributed.barrier(f"oat_jax:set-aside-{self.arm}-{epoch}")
                self._manager.reload()
                warn(f"checkpoint {os.path.join(self.directory, str(epoch))} cannot be restored "
                     f"({type(error).__name__}: {_first_line(error)}); moved to {moved}, "
                     "going back to the previous checkpoint")
        return None, None

    def close(self) -> None:
        """Waits for a save in flight to be complete on disk."""
        self._manager.wait_until_finished()
        self._manager.close()


class PartialEpochs:
    """An epoch stopped part-way by Ctrl-C or SIGTERM: the replicas' states after its first ``step`` steps and
    the epoch's running records (arrays), in ``<workdir>/checkpoints/<arm>-partial/``, so that a rerun
    finishes the epoch exactly as an uninterrupted run would. Only the latest is kept; ``clear`` removes it
    once the epoch is complete."""

    def __init__(self, workdir: str, arm: str):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints", f"{arm}-partial")

    def _manager(self):
        handlers = {"states": ocp.StandardCheckpointHandler(), "records": ocp.StandardCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False))

    def save(self, epoch: int, step: int, states, records: dict) -> None:
        with _saving(self.directory):
            manager = self._manager()
            # One number per (epoch, step): a later stop of the same epoch is a newer checkpoint, not a clash.
            manager.save(epoch * _STEPS_PER_EPOCH_BOUND + step, args=ocp.args.Composite(
                states=ocp.args.StandardSave(states), records=ocp.args.StandardSave(records)))
            manager.wait_until_finished()
            manager.close()

    def restore(self, epoch: int, template, warn):
        """(step, states, records) of a stop within ``epoch``, or None when there is none. One that does not
        restore is moved aside to ``checkpoints/corrupt/`` (``warn`` names it) and the epoch starts over; one
        that does not fit ``template`` raises CheckpointMismatch."""
        if not os.path.isdir(self.directory):
            return None
        manager = self._manager()
        try:
            latest = manager.latest_step()
            if latest is None or latest // _STEPS_PER_EPOCH_BOUND != epoch:
                return None
            _check_fits(self.directory, lambda: manager.item_metadata(latest)["states"], template)
            restored = manager.restore(latest, args=ocp.args.Composite(
                states=ocp.args.StandardRestore(template), records=ocp.args.StandardRestore()))
            return latest % _STEPS_PER_EPOCH_BOUND, restored["states"], restored["records"]
        except CheckpointMismatch:
            raise
        except Exception as error:  # as in ArmCheckpoints.restore_latest
            moved = _set_aside(self.directory, os.path.dirname(self.directory), os.path.basename(self.directory))
            distributed.barrier(f"oat_jax:set-aside-{os.path.basename(self.directory)}")
            warn(f"the part-way checkpoint {self.directory} cannot be restored ({type(error).__name__}: "
                 f"{_first_line(error)}); moved to {moved}, epoch {epoch} starts over")
            return None
        finally:
            manager.close()

    def clear(self) -> None:
        if distributed.is_primary():
            shutil.rmtree(self.directory, ignore_errors=True)
        distributed.barrier(f"oat_jax:cleared-{os.path.basename(self.directory)}")


# Steps of one epoch are fewer than this (a million batches), so epoch * bound + step orders the stops.
_STEPS_PER_EPOCH_BOUND = 1_000_000


def _check_fits(path: str, read_metadata, template) -> None:
    """Raises CheckpointMismatch when the arrays saved at ``path`` (their stored metadata, without reading
    the data) differ from ``template``'s in tree paths, shapes or dtypes. Metadata that cannot be read is
    left to the restore to judge: damage, if the restore fails."""
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
    """{"params/head/bias": "(1, 64, 10) float32"} in the tree's order: the same names for a state and for the
    metadata Orbax saved of it."""
    def name(key):
        for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)
    return {"/".join(map(name, path)): f"{tuple(leaf.shape)} {leaf.dtype}"
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _set_aside(path: str, checkpoints: str, name: str) -> str:
    """Moves a damaged checkpoint folder to ``<checkpoints>/corrupt/<name>[-k]``; returns where (process 0
    moves it; the others only answer where)."""
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
