"""TensorBoard event files beside metrics.jsonl, read back with a reader written here: the TFRecord framing
(length, its checksum, the event, its checksum) parsed by hand, the events decoded with the protobuf
definitions tensorboardX ships. test_train.py checks a real run's events the same way after a resume."""
import os

import pytest

from oat_jax.tensorboard import TensorBoardLog
from conftest import scalars_of





def _record(arm, epoch, seed, accuracy):
    return {"arm": arm, "epoch": epoch, "seed": seed, "objective": arm, "train_loss": 1.0 / epoch,
            "test_accuracy": accuracy, "anchor": [0.2, 0.3, 0.5], "step_anchors": [], "prediction_share": [1, 0, 0]}


def test_records_become_one_run_per_arm_and_seed_rebuilt_from_the_log(tmp_path):
    records = [_record("ce", epoch, seed, 50.0 + epoch + seed) for epoch in (1, 2) for seed in (0, 1)]
    log = TensorBoardLog(str(tmp_path), records[:2], seeds=[0, 1])
    for record in records[2:]:
        log.add(record)
    log.close()
    assert sorted(os.listdir(tmp_path / "tensorboard" / "ce")) == ["seed_0", "seed_1"]
    seed_1 = scalars_of(tmp_path / "tensorboard" / "ce" / "seed_1")
    assert seed_1["test_accuracy"] == {1: 52.0, 2: 53.0}
    assert seed_1["train_loss"] == pytest.approx({1: 1.0, 2: 0.5})
    assert seed_1["anchor/class_002"] == pytest.approx({1: 0.5, 2: 0.5})
    assert "seed" not in seed_1 and "epoch" not in seed_1
    # A resume whose log was cut back to epoch 1 rebuilds the events from it: epoch 2 is gone until redone.
    TensorBoardLog(str(tmp_path), records[:2], seeds=[0, 1]).close()
    assert scalars_of(tmp_path / "tensorboard" / "ce" / "seed_1")["test_accuracy"] == {1: 52.0}
