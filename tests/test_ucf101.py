"""Tests for UCF-101 middle frames: a tiny official layout, and a tiny tensorflow-datasets preparation.

tfds.testing.mock_data cannot stand in for ucf101 without TensorFlow (tfds' Video feature needs it even
to be constructed), so the prepared array_record files are written here with tfds' own TensorFlow-free
feature encoder and example serializer, as tfds would write them.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from oat_jax.data import DatasetError, DatasetUnavailable, load_dataset, locations, tfds_source, tfds_video, ucf101
from conftest import COLOURS, VIDEOS, colour_index, frames_for, write_official

pytestmark = pytest.mark.usefixtures("isolated_data")  # only this test's data and cache are visible

def check_official(ds, image_size):
    assert ds.name == "ucf101" and ds.num_classes == 3
    assert ds.train_images.shape == (4, image_size, image_size, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (3, image_size, image_size, 3)
    assert ds.train_labels.tolist() == [0, 0, 1, 2] and ds.test_labels.tolist() == [0, 1, 2]
    middles = [colour_index(image) for image in list(ds.train_images) + list(ds.test_images)]
    assert middles == list(range(len(VIDEOS)))


# ---------------------------------------------------------------- official layout


def test_official_from_data_dir(tmp_path):
    root = write_official(tmp_path / "ucf")
    ds = load_dataset("ucf101", str(root), image_size=16)
    assert ds.source == str(root)
    check_official(ds, 16)


@pytest.mark.parametrize("where", ["env", "system"])
def test_official_found_in_default_places(tmp_path, monkeypatch, where):
    write_official(tmp_path / "data" / "ucf101")
    if where == "env":
        monkeypatch.setenv("OAT_DATA_DIR", str(tmp_path / "data"))
    else:
        monkeypatch.setattr(locations, "SYSTEM_DIR", str(tmp_path / "data"))
    check_official(load_dataset("ucf101", image_size=8), 8)


def test_official_stored_size_and_cache_reuse(tmp_path, monkeypatch):
    root = write_official(tmp_path / "ucf")
    first = load_dataset("ucf101", str(root))
    assert first.train_images.shape == (4, 24, 32, 3)

    def fail(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(ucf101, "read_middle_frame", fail)
    second = load_dataset("ucf101", str(root), train_limit=2)
    assert isinstance(second.train_images, np.memmap)
    np.testing.assert_array_equal(second.train_images, first.train_images[:2])


def test_missing_listed_video(tmp_path):
    root = write_official(tmp_path / "ucf")
    missing = root / ucf101.VIDEOS / "Archery" / "v_Archery_g08_c01.avi"
    missing.unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("ucf101", str(root))
    assert str(missing) in str(err.value) and "testlist01.txt" in str(err.value)


def test_unreadable_video(tmp_path):
    root = write_official(tmp_path / "ucf")
    broken = root / ucf101.VIDEOS / "Archery" / "v_Archery_g01_c01.avi"
    broken.write_bytes(b"RIFF\0\0\0\0AVI garbage" * 10)
    with pytest.raises(DatasetError) as err:
        load_dataset("ucf101", str(root), image_size=8)
    assert str(broken) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "line, problem",
    [("Archery/v_Archery_g01_c01.avi 3", "label 3 but Archery is class 2"),
     ("Juggling/v_Juggling_g01_c01.avi 1", "class folder 'Juggling' is not in classInd.txt")],
)
def test_bad_train_list_line(tmp_path, line, problem):
    root = write_official(tmp_path / "ucf")
    train_list = root / ucf101.LISTS / "trainlist01.txt"
    train_list.write_text(train_list.read_text() + line + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("ucf101", str(root))
    assert problem in str(err.value) and "trainlist01.txt line 5" in str(err.value)


def test_explicit_dir_without_copy(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("ucf101", str(tmp_path))
    message = str(err.value)
    assert not isinstance(err.value, DatasetUnavailable)
    assert str(tmp_path) in message and "UCF-101/<Class>" in message and "ucf101_1_256" in message


def test_unavailable_everywhere(monkeypatch):
    monkeypatch.setattr(tfds_source, "_tensorflow_available", lambda: False)
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset("ucf101")
    message = str(err.value)
    assert "\n" not in message and message.startswith("UCF-101 not found")
    assert "crcv.ucf.edu" in message and "University of Central Florida" in message
    assert "The Train/Test Splits for Action Recognition on UCF101 data set" in message
    assert "/usr/share/datasets/ucf101" in message and "OAT_DATA_DIR" in message
    assert "TensorFlow" in message and "not installed" in message and "network" in message


# ---------------------------------------------------------------- tensorflow-datasets preparation


def jpeg(colour) -> io.BytesIO:
    data = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(data, format="JPEG", quality=95)
    data.seek(0)
    return data


def write_tfds_prepared(data_dir, garbage=None):
    """ucf101/ucf101_1_256/2.0.0/ucf101-<split>.array_record-<i>-of-<n> as tfds writes them.

    Record k (counted over both splits) has label (7 * k) % 101 and middle frame COLOURS[k % 7];
    record 1 is ``garbage`` when that is given.
    """
    shard_sizes = {"train": (3, 2), "test": (2,)}
    tfds = pytest.importorskip("tensorflow_datasets")
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.core import example_serializer

    features = tfds.features.FeaturesDict({
        # What tfds.features.Video(encoding_format="jpeg") stores: a sequence of encoded images.
        "video": tfds.features.Sequence(tfds.features.Image(shape=(16, 16, 3), encoding_format="jpeg")),
        "label": tfds.features.ClassLabel(num_classes=101),
    })
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    folder = data_dir / "ucf101" / ucf101.TFDS_CONFIG / "2.0.0"
    folder.mkdir(parents=True)
    k = 0
    for split, sizes in shard_sizes.items():
        for shard, size in enumerate(sizes):
            writer = ArrayRecordWriter(str(folder / f"ucf101-{split}.array_record-{shard:05d}-of-{len(sizes):05d}"),
                                       "group_size:1")
            for _ in range(size):
                video = [jpeg(c) for c in frames_for(k % len(COLOURS))]
                example = features.encode_example({"video": video, "label": (7 * k) % 101})
                writer.write(garbage if garbage and k == 1 else serializer.serialize_example(example))
                k += 1
            writer.close()
    return folder


def check_tfds(ds, folder):
    assert ds.source == f"tensorflow-datasets:ucf101 ({folder})" and ds.num_classes == 101
    assert ds.train_images.shape == (5, 8, 8, 3) and ds.test_images.shape == (2, 8, 8, 3)
    assert ds.train_labels.tolist() == [0, 7, 14, 21, 28] and ds.test_labels.tolist() == [35, 42]
    middles = [colour_index(image) for image in list(ds.train_images) + list(ds.test_images)]
    assert middles == [0, 1, 2, 3, 4, 5, 6]


def test_tfds_prepared_read_without_tensorflow(tmp_path, monkeypatch):
    tf_before = "tensorflow" in sys.modules
    folder = write_tfds_prepared(tmp_path / "tfds")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    check_tfds(load_dataset("ucf101", image_size=8), folder)
    if not tf_before:
        assert "tensorflow" not in sys.modules


def test_tfds_prepared_as_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_video, "_BATCH", 2)  # shards of 3 records take two reads
    folder = write_tfds_prepared(tmp_path / "tfds")
    check_tfds(load_dataset("ucf101", str(tmp_path / "tfds"), image_size=8), folder)


def test_tfds_corrupt_record_named(tmp_path, monkeypatch):
    folder = write_tfds_prepared(tmp_path / "tfds", garbage=b"\xff\xff\xff not a proto")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DatasetError) as err:
        load_dataset("ucf101", image_size=8)
    assert f"{folder / 'ucf101-train.array_record-00000-of-00002'} record 1" in str(err.value)
