"""The run's record: ``metrics.jsonl`` (one JSON line per arm and epoch) and ``summary.json``."""
from __future__ import annotations

import json
import os
import statistics

from oat_jax.disk_full import writing


class MetricsLog:
    """Append-only JSON lines, cut back on resume to the epochs that have a checkpoint. With ``write=False``
    (the other processes of a run over several) the same records are kept in memory only. A ``mirror`` (the
    TensorBoard events) gets every appended record too."""

    def __init__(self, path: str, write: bool = True):
        self.path = path
        self.write = write
        self.mirror = None
        self._records = read_records(path)

    def records(self) -> list[dict]:
        return list(self._records)

    def keep_only(self, last_epoch_of_arm: dict[str, int]) -> None:
        """Drops lines of epochs after each arm's last checkpoint: those epochs will be trained again."""
        self._records = [r for r in self._records if r["epoch"] <= last_epoch_of_arm.get(r["arm"], 0)]
        if self.write:
            tmp = self.path + ".tmp"
            with writing(self.path), open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self._records)
            os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        self._records.append(record)
        if self.write:
            with writing(self.path), open(self.path, "a") as f:  # a line cut short by a full disk is redone
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.mirror is not None:
            self.mirror.add(record)
            self.mirror.flush()


def read_records(path: str) -> list[dict]:
    """The lines of a metrics.jsonl file ([] when there is none)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill; its epoch is redone
                break
    return records


def _arm_summary(history: list[dict]) -> dict:
    best = max(history, key=lambda r: (r["test_accuracy"], -r["epoch"]))
    return {
        "final_test_accuracy": history[-1]["test_accuracy"],
        "final_epoch": history[-1]["epoch"],
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
    }


def summarise(records: list[dict], arms: list[str], paper: dict) -> dict:
    """Each arm's final and best test accuracy (%), per seed and as mean and standard deviation over seeds.

    The cross-entropy arm continues the shared pre-training, so its history is the pre-training epochs
    followed by its own; the OAT arm's best is taken over its OAT epochs only.
    """
    summary = {"arms": {}, "paper": paper if paper.get("table") else None}
    seeds = sorted({r["seed"] for r in records})
    for arm in arms:
        per_seed = {}
        for seed in seeds:
            history = [r for r in records if r["seed"] == seed and (
                r["arm"] == arm or (arm == "ce" and r["arm"] == "pretrain"))]
            if history and (arm == "ce" or any(r["arm"] == arm for r in history)):
                per_seed[str(seed)] = _arm_summary(sorted(history, key=lambda r: r["epoch"]))
        if not per_seed:
            continue
        result = {"seeds": per_seed, "final_epoch": max(s["final_epoch"] for s in per_seed.values())}
        for key in ("final_test_accuracy", "best_test_accuracy"):
            values = [s[key] for s in per_seed.values()]
            result[key] = statistics.fmean(values)
            result[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if len(per_seed) == 1:
            result["best_epoch"] = next(iter(per_seed.values()))["best_epoch"]
        summary["arms"][arm] = result
    return summary


def write_json(path: str, value: dict) -> None:
    """Writes atomically, so a reader never sees half a file."""
    tmp = path + ".tmp"
    with writing(path), open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
