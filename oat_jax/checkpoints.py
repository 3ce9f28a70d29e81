"""Orbax checkpoints of one training arm: ``<workdir>/checkpoints/<arm>/<epoch>``.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed at any
moment leaves only whole checkpoints behind; the latest one is where a rerun resumes.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


class ArmCheckpoints:
    """The latest states of one arm ("pretrain", "ce" or "oat"), one per finished epoch (step = epoch)."""

    def __init__(self, workdir: str, arm: str, max_to_keep: int = 2):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints", arm)
        # Two are kept so that the previous epoch survives while the next one is being written. Saving is
        # synchronous: the states are small (a tenth of a second here), and an epoch's checkpoint is then
        # complete on disk before the next epoch starts, with no background threads competing for the CPU.
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                                 enable_async_checkpointing=False))

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def save(self, epoch: int, state) -> None:
        self._manager.save(epoch, args=ocp.args.StandardSave(state))

    def restore(self, epoch: int, template):
        """The state saved at ``epoch``, with the structure (and static fields) of ``template``."""
        return self._manager.restore(epoch, args=ocp.args.StandardRestore(template))

    def close(self) -> None:
        """Waits for a save in flight to be complete on disk."""
        self._manager.wait_until_finished()
        self._manager.close()
