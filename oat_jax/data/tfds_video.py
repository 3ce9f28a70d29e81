"""Middle frames of a video dataset prepared by tensorflow-datasets, read without TensorFlow.

tfds' own readers cannot serve here: its ``Video`` feature needs TensorFlow
even to be constructed, so without TensorFlow neither ``tfds.builder`` nor a
data source (nor ``tfds.testing.mock_data``) exists for a video dataset. The
prepared files need no TensorFlow, though: each ``array_record`` record is a
serialized ``tf.train.Example`` whose ``video`` feature lists the frames as
encoded images (JPEG for ucf101) and whose ``label`` is an int64, and tfds
ships a TensorFlow-free copy of that proto. So the records are read directly
and only the middle frame of each video is decoded, a small fraction of the
work of decoding every frame. Preparing the dataset still needs TensorFlow.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import io
import os

import numpy as np

from oat_jax.data import Dataset, DatasetError, DatasetUnavailable, cache, stacking, tfds_source
from oat_jax.data.images import error_line, read_image

SPLITS = ("train", "test")
_FILE_FORMAT = "array_record"
_BATCH = 64  # records read at a time: a 256x256 UCF-101 video is about 2 MB of JPEG frames


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The files of one prepared tfds dataset version."""

    folder: str  # <data_dir>/<name>/<config>/<version>
    shards: dict[str, list[str]]  # split -> array_record shard paths


def tfds_data_dir() -> str:
    """tensorflow-datasets' data folder: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets"))


def find_prepared(data_dir: str, name: str, config: str) -> Prepared | None:
    """The newest version of ``name/config`` prepared as array_record files under ``data_dir``, or None."""
    base = os.path.join(data_dir, name, config)
    try:
        versions = sorted(os.listdir(base), key=_version_key, reverse=True)
    except OSError:
        return None
    for version in versions:
        folder = os.path.join(base, version)
        shards = {
            split: sorted(glob.glob(os.path.join(glob.escape(folder), f"{name}-{split}.{_FILE_FORMAT}-*")))
            for split in SPLITS
        }
        if all(shards.values()):
            return Prepared(folder, shards)
    return None


def prepare(name: str, config: str, data_dir: str, builder_module: str) -> Prepared:
    """Download and prepare ``name/config`` with tensorflow-datasets (needs TensorFlow and network).

    ``builder_module`` is imported first to register the builder: without
    TensorFlow, tfds does not import its video datasets. Raises
    DatasetUnavailable with a one-line reason when that is not possible.
    """
    if not tfds_source._tensorflow_available():
        raise DatasetUnavailable(
            f"tensorflow-datasets has not prepared {name}/{config} in {data_dir}, and TensorFlow, "
            "which it needs to download and prepare it, is not installed"
        )
    try:
        import tensorflow_datasets as tfds

        importlib.import_module(builder_module)
        with tfds_source._quiet_absl():
            builder = tfds.builder(f"{name}/{config}", data_dir=data_dir, file_format=_FILE_FORMAT)
            tfds_source.require_network(f"{name}/{config}", builder)  # offline: fail in seconds, not minutes
            builder.download_and_prepare(file_format=_FILE_FORMAT)
    except DatasetUnavailable:
        raise
    except Exception as e:  # any tfds failure becomes one line, not a traceback
        raise DatasetUnavailable(
            f"tensorflow-datasets failed to download and prepare {name}/{config} in {data_dir}: {error_line(e)}"
        ) from None
    prepared = find_prepared(data_dir, name, config)
    if prepared is None:
        raise DatasetUnavailable(f"tensorflow-datasets prepared {name}/{config}, but no array_record files appeared")
    return prepared


def middle_frames_dataset(name: str, prepared: Prepared, num_classes: int, image_size: int) -> Dataset:
    """Both splits' middle frames as a Dataset, decoded once and cached (see cache.py)."""
    reader_class, example_class = _readers()
    rows = [
        (split, os.path.basename(shard), *cache.file_stat(shard))
        for split, shards in prepared.shards.items()
        for shard in shards
    ]

    def decode(where: str, data: bytes) -> np.ndarray:
        return read_image(io.BytesIO(data), image_size, where)

    def build(writer: cache.ArrayWriter) -> None:
        for split, shards in prepared.shards.items():
            labels: list[int] = []
            count = sum(_num_records(reader_class, shard) for shard in shards)
            frames = _middle_frames(reader_class, example_class, shards, labels)
            stacking.stack_decoded(frames, count, decode, writer.empty, f"{name} {split}", split)
            writer.save(f"{split}_labels", np.array(labels, np.int32))

    arrays = cache.load_or_build(name, prepared.folder, image_size, cache.fingerprint(rows), build)
    return stacking.from_arrays(name, arrays, num_classes, f"tensorflow-datasets:{name} ({prepared.folder})")


def _middle_frames(reader_class, example_class, shards: list[str], labels: list[int]):
    """Yield (record name, encoded middle frame) of every record, appending its label to ``labels``."""
    for shard in shards:
        reader = _open(reader_class, shard)
        try:
            total = reader.num_records()
            for start in range(0, total, _BATCH):
                for offset, record in enumerate(reader.read(start, min(start + _BATCH, total))):
                    where = f"{shard} record {start + offset}"
                    frame, label = _parse(example_class, record, where)
                    labels.append(label)
                    yield where, frame
        finally:
            reader.close()


def _parse(example_class, record: bytes, where: str) -> tuple[bytes, int]:
    """(encoded middle frame, label) of one serialized tf.train.Example."""
    try:
        features = example_class.FromString(record).features.feature
        frames = features["video"].bytes_list.value
        labels = features["label"].int64_list.value
    except Exception as e:  # protobuf's DecodeError, or a missing key
        raise DatasetError(f"{where}: not a tfds video example: {error_line(e)}") from None
    if not frames or len(labels) != 1:
        raise DatasetError(f"{where}: {len(frames)} video frames and {len(labels)} labels; expected frames, 1 label")
    return frames[len(frames) // 2], int(labels[0])


def _num_records(reader_class, shard: str) -> int:
    reader = _open(reader_class, shard)
    try:
        return reader.num_records()
    finally:
        reader.close()


def _open(reader_class, shard: str):
    try:
        return reader_class(shard)
    except Exception as e:  # array_record raises RuntimeError/ValueError on damaged files
        raise DatasetError(f"{shard}: cannot read array_record file: {error_line(e)}") from None


def _readers():
    """(ArrayRecordReader, tf.train.Example proto class), both free of TensorFlow."""
    try:
        from array_record.python.array_record_module import ArrayRecordReader
        from tensorflow_datasets.proto import tf_example_pb2
    except ImportError as e:
        raise DatasetError(
            f"reading a prepared tensorflow-datasets copy needs tensorflow-datasets and array_record ({e}): "
            "pip install tensorflow-datasets"
        ) from None
    return ArrayRecordReader, tf_example_pb2.Example


def _version_key(version: str) -> tuple:
    """A version folder's name as numbers, (2, 0, 0) for 2.0.0, so that 10.0.0 ranks above 9.0.0;
    a name that is no version ranks below all."""
    parts = version.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()
