"""The run's metrics as TensorBoard event files, beside metrics.jsonl: ``tensorboard --logdir <workdir>/tensorboard``.

One TensorBoard run per arm (``<arm>``, or ``<arm>/seed_<s>`` with several seeds), the epoch as the step:
every scalar of a metrics.jsonl line, and the epoch-mean training anchor per class (``anchor/class_<c>``).
metrics.jsonl stays the record: the event files are written anew from it when a run starts, so epochs
trained again after a resume appear once. Written with tensorboardX, which needs no TensorFlow.
"""
from __future__ import annotations

import os
import shutil

from oat_jax.disk_full import writing

FOLDER = "tensorboard"


class TensorBoardLog:
    """Writes records (metrics.jsonl lines) as events under ``<workdir>/tensorboard``."""

    def __init__(self, workdir: str, records: list[dict], seeds: list[int]):
        self.directory = os.path.join(workdir, FOLDER)
        self._several_seeds = len(seeds) > 1
        self._writers = {}
        shutil.rmtree(self.directory, ignore_errors=True)  # rebuilt from the log, which may have been cut back
        for record in records:
            self.add(record)
        self.flush()

    def add(self, record: dict) -> None:
        writer = self._writer(record)
        epoch = record["epoch"]
        with writing(writer.logdir):
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "seed"):
                    writer.add_scalar(key, value, epoch)
            for c, value in enumerate(record.get("anchor", [])):
                writer.add_scalar(f"anchor/class_{c:03d}", value, epoch)

    def flush(self) -> None:
        for writer in self._writers.values():
            with writing(writer.logdir):
                writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            with writing(writer.logdir):
                writer.close()
        self._writers = {}

    def _writer(self, record: dict):
        run = record["arm"] + (f"/seed_{record['seed']}" if self._several_seeds else "")
        if run not in self._writers:
            from tensorboardX import SummaryWriter  # imported on use: it pulls in protobuf
            self._writers[run] = SummaryWriter(os.path.join(self.directory, run), flush_secs=60)
        return self._writers[run]
