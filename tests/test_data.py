"""Tests for oat_jax.data: IDX reading, the two datasets, limits, checks, tfds fallback.

All data is generated in tmp_path (the real Debian Fashion-MNIST copy is used
only by one test, skipped where it is absent); nothing touches the network.
"""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from oat_jax.data import (
    Dataset,
    DatasetError,
    DatasetUnavailable,
    cifar10,
    dataset_names,
    fashion_mnist,
    load_dataset,
    register_dataset,
    tfds_source,
)
from oat_jax.data.idx import read_idx
from conftest import cifar_blobs, write_cifar_archive

# Captured before the autouse fixture hides it, for the real-data test.
DEBIAN_DIR = fashion_mnist.DEFAULT_DIR

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


@pytest.fixture(autouse=True)
def no_ambient_data(tmp_path, monkeypatch):
    """Hide every data location the machine may have, so each test sees only its own."""
    monkeypatch.delenv("OAT_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", str(tmp_path / "no-debian-copy"))
    empty_tfds = tmp_path / "tfds-empty"
    empty_tfds.mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty_tfds))


# ---------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array in the IDX format (big-endian header and payload)."""
    code = _IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)


def fake_fashion(n_train=12, n_test=5, seed=0):
    """Random (train_images, train_labels, test_images, test_labels), IDX-shaped."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        (np.arange(n_train) % 10).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        (np.arange(n_test) % 10).astype(np.uint8),
    )


def write_fashion(folder, arrays, gz=(True, False, True, False)):
    """Write the four Fashion-MNIST files into folder, some with .gz, some plain."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array, compress in zip(fashion_mnist.FILES.values(), arrays, gz):
        write_idx(folder / (name + (".gz" if compress else "")), array, compress)
    return folder


def write_cifar_folder(parent):
    folder = parent / cifar10.FOLDER
    folder.mkdir(parents=True)
    for name, blob in cifar_blobs().items():
        (folder / name).write_bytes(blob)
    return folder


def check_cifar(ds: Dataset):
    assert ds.train_images.shape == (10, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (3, 32, 32, 3)
    assert ds.train_labels.dtype == np.int32
    # data_batch_1 labels start at 0, data_batch_2 at 1, ...
    assert ds.train_labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    # CHW rows -> HWC: pixel (y, x, c) of row r was at c*1024 + y*32 + x.
    for r, y, x, c in [(0, 0, 0, 0), (1, 5, 9, 2), (0, 31, 31, 1), (1, 0, 1, 2)]:
        assert ds.train_images[r, y, x, c] == (r * 7 + c * 1024 + y * 32 + x) % 256
    assert ds.test_images[2, 3, 4, 1] == (2 * 7 + 1024 + 3 * 32 + 4) % 256


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),  # images
        np.array([0, 9, 3, 255], dtype=np.uint8),  # labels
        np.array([[-70000, 5], [1, 2**30]], dtype=np.int32),  # multi-byte endianness
    ],
)
def test_idx_round_trip(tmp_path, array, compress):
    path = tmp_path / "data-idx"
    write_idx(path, array, compress)
    out = read_idx(path)
    assert out.dtype == array.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_idx_detects_gzip_by_content_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    plain_named_gz = tmp_path / "labels.gz"
    write_idx(plain_named_gz, array, compress=False)
    gz_named_plain = tmp_path / "labels"
    write_idx(gz_named_plain, array, compress=True)
    np.testing.assert_array_equal(read_idx(plain_named_gz), array)
    np.testing.assert_array_equal(read_idx(gz_named_plain), array)


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda good: good[:-3], "truncated"),
        (lambda good: good + b"\0", "trailing"),
        (lambda good: b"\x12\x34" + good[2:], "not an IDX"),
        (lambda good: good[:2] + b"\x42" + good[3:], "dtype code"),
        (lambda good: good[:6], "dimension"),
        (lambda good: b"\0\0", "too short"),
        (lambda good: b"\x1f\x8b" + b"garbage" * 5, "gzip"),
        (lambda good: gzip.compress(good)[:-12], "gzip"),  # cut-off stream
    ],
    ids=["truncated", "trailing", "magic", "dtype", "dims", "short", "bad-gzip", "cut-gzip"],
)
def test_idx_corrupt_files_name_the_file(tmp_path, corrupt, problem):
    good = idx_bytes(np.zeros((4, 3, 3), np.uint8))
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(corrupt(good))
    with pytest.raises(DatasetError) as err:
        read_idx(path)
    assert str(path) in str(err.value) and problem in str(err.value)
    assert "\n" not in str(err.value)


def test_idx_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="absent-file"):
        read_idx(tmp_path / "absent-file")


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_from_data_dir(tmp_path):
    arrays = fake_fashion()
    folder = write_fashion(tmp_path / "fm", arrays)
    ds = load_dataset("fashion_mnist", data_dir=str(folder))
    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert ds.source == str(folder)
    assert ds.train_images.shape == (12, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (5, 28, 28, 1)
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays[0])
    np.testing.assert_array_equal(ds.test_labels, arrays[3])


def test_fashion_from_env(tmp_path, monkeypatch):
    arrays = fake_fashion(seed=1)
    folder = write_fashion(tmp_path / "env-dir", arrays, gz=(False,) * 4)
    monkeypatch.setenv("OAT_DATA_DIR", str(folder))
    ds = load_dataset("fashion_mnist")
    assert ds.source == str(folder)
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays[2])


def test_fashion_from_default_dir(tmp_path, monkeypatch):
    folder = write_fashion(tmp_path / "debian", fake_fashion())
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", str(folder))
    assert load_dataset("fashion_mnist").source == str(folder)


def test_fashion_explicit_dir_without_files_does_not_fall_back(tmp_path, monkeypatch):
    # A valid copy elsewhere must not be used silently instead.
    monkeypatch.setenv("OAT_DATA_DIR", str(write_fashion(tmp_path / "good", fake_fashion())))
    partial = tmp_path / "partial"
    partial.mkdir()
    write_idx(partial / "train-images-idx3-ubyte", fake_fashion()[0], compress=False)
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion_mnist", data_dir=str(partial))
    message = str(err.value)
    assert not isinstance(err.value, DatasetUnavailable)
    assert str(partial) in message and "t10k-labels-idx1-ubyte" in message
    assert "train-images-idx3-ubyte," not in message  # present, so not listed missing


def test_fashion_image_label_count_mismatch(tmp_path):
    train_x, train_y, test_x, test_y = fake_fashion()
    folder = write_fashion(tmp_path / "fm", (train_x, train_y[:-1], test_x, test_y))
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", data_dir=str(folder))


@pytest.mark.skipif(
    not os.path.isdir(DEBIAN_DIR),
    reason=f"{DEBIAN_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_fashion_real_debian_files():
    ds = load_dataset("fashion_mnist", data_dir=DEBIAN_DIR)
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert set(np.unique(ds.train_labels)) == set(range(10))
    assert set(np.unique(ds.test_labels)) == set(range(10))
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_from_archive(tmp_path):
    archive = write_cifar_archive(tmp_path / cifar10.ARCHIVE)
    ds = load_dataset("cifar10", data_dir=str(archive))
    assert ds.source == str(archive) and ds.num_classes == 10
    check_cifar(ds)


def test_cifar_archive_inside_env_dir(tmp_path, monkeypatch):
    write_cifar_archive(tmp_path / cifar10.ARCHIVE)
    monkeypatch.setenv("OAT_DATA_DIR", str(tmp_path))
    ds = load_dataset("cifar10")
    assert ds.source == str(tmp_path / cifar10.ARCHIVE)
    check_cifar(ds)


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar_from_extracted_folder(tmp_path, point_at):
    folder = write_cifar_folder(tmp_path)
    ds = load_dataset("cifar10", data_dir=str(tmp_path if point_at == "parent" else folder))
    assert ds.source == str(folder)
    check_cifar(ds)


def test_cifar_explicit_dir_without_copy(tmp_path):
    with pytest.raises(DatasetError, match="does not hold CIFAR-10"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_corrupt_archive(tmp_path):
    archive = tmp_path / cifar10.ARCHIVE
    archive.write_bytes(gzip.compress(b"not a tar file at all" * 40)[:-20])
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", data_dir=str(archive))
    assert str(archive) in str(err.value) and "\n" not in str(err.value)


def test_cifar_archive_missing_batch(tmp_path):
    blobs = cifar_blobs()
    del blobs["data_batch_3"]
    archive = write_cifar_archive(tmp_path / cifar10.ARCHIVE, blobs)
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=str(archive))


def test_cifar_corrupt_pickle_names_file(tmp_path):
    folder = write_cifar_folder(tmp_path)
    (folder / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match="data_batch_2"):
        load_dataset("cifar10", data_dir=str(folder))


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = write_cifar_folder(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DatasetError, match="test_batch.*refusing"):
        load_dataset("cifar10", data_dir=str(folder))


# ---------------------------------------------------------------- registry, limits, checks


def test_limits(tmp_path):
    arrays = fake_fashion()
    folder = write_fashion(tmp_path / "fm", arrays)
    ds = load_dataset("fashion_mnist", data_dir=str(folder), train_limit=3, test_limit=2)
    assert ds.train_images.shape == (3, 28, 28, 1) and ds.train_labels.shape == (3,)
    assert ds.test_images.shape == (2, 28, 28, 1) and ds.test_labels.shape == (2,)
    np.testing.assert_array_equal(ds.train_labels, arrays[1][:3])
    # A limit above the size keeps everything.
    assert len(load_dataset("fashion_mnist", str(folder), train_limit=10**6).train_labels) == 12


@pytest.mark.parametrize("limits", [(-1, 0), (0, -5)])
def test_negative_limit(tmp_path, limits):
    folder = write_fashion(tmp_path / "fm", fake_fashion())
    with pytest.raises(DatasetError, match="_limit must be >= 0"):
        load_dataset("fashion_mnist", str(folder), *limits)


def test_negative_image_size(tmp_path):
    folder = write_fashion(tmp_path / "fm", fake_fashion())
    with pytest.raises(DatasetError, match="image_size must be >= 0"):
        load_dataset("fashion_mnist", str(folder), image_size=-1)


def test_image_size_resizes_fixed_size_datasets(tmp_path):
    # As torchvision's Resize((S, S)) on a PIL image: bilinear, antialiased, channels kept.
    arrays = fake_fashion()
    folder = write_fashion(tmp_path / "fm", arrays)
    ds = load_dataset("fashion_mnist", str(folder), train_limit=3, image_size=14)
    assert ds.train_images.shape == (3, 14, 14, 1) and ds.test_images.shape == (5, 14, 14, 1)
    assert ds.train_images.dtype == np.uint8
    expected = Image.fromarray(arrays[0][1], "L").resize((14, 14), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(ds.train_images[1, ..., 0], np.asarray(expected))
    same = load_dataset("fashion_mnist", str(folder), image_size=28)  # the stored size: untouched
    np.testing.assert_array_equal(same.train_images[..., 0], arrays[0])

    archive = write_cifar_archive(tmp_path / cifar10.ARCHIVE)
    stored = load_dataset("cifar10", str(archive))
    resized = load_dataset("cifar10", str(archive), image_size=40)
    assert resized.train_images.shape == (10, 40, 40, 3) and resized.test_images.shape == (3, 40, 40, 3)
    expected = Image.fromarray(stored.test_images[2], "RGB").resize((40, 40), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(resized.test_images[2], np.asarray(expected))


def test_label_out_of_range(tmp_path):
    train_x, train_y, test_x, test_y = fake_fashion()
    test_y = test_y.copy()
    test_y[3] = 10
    folder = write_fashion(tmp_path / "fm", (train_x, train_y, test_x, test_y))
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion_mnist", data_dir=str(folder))
    assert "test split" in str(err.value) and "label 10" in str(err.value)


def test_unknown_dataset_lists_known():
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet")
    assert "imagenet" in str(err.value)
    for name in ("cifar10", "fashion_mnist"):
        assert name in str(err.value)
    assert {"cifar10", "fashion_mnist"} <= set(dataset_names())


def test_local_load_imports_no_tensorflow(tmp_path):
    # Checked in a fresh interpreter: this test process imports tfds elsewhere.
    folder = write_fashion(tmp_path / "fm", fake_fashion())
    code = (
        "import sys; from oat_jax.data import load_dataset; "
        f"load_dataset('fashion_mnist', {str(folder)!r}); "
        "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- tensorflow-datasets


@pytest.mark.parametrize(
    "name, shape", [("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))]
)
def test_tfds_fallback_under_mock(name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    tf_before = "tensorflow" in sys.modules
    with tfds.testing.mock_data(num_examples=7):
        ds = load_dataset(name)
    assert ds.source == f"tensorflow-datasets:{name}"
    assert ds.train_images.shape == (7,) + shape and ds.test_images.shape == (7,) + shape
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.shape == (7,)
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
    if not tf_before:
        assert "tensorflow" not in sys.modules


def test_tfds_source_reads_more_than_one_batch():
    tfds = pytest.importorskip("tensorflow_datasets")
    n = tfds_source._BATCH + 5
    with tfds.testing.mock_data(num_examples=n):
        train_x, train_y, test_x, test_y = tfds_source.load_tfds("cifar10", None)
    assert train_x.shape == (n, 32, 32, 3) and train_y.shape == (n,)
    assert train_x[-1].any()  # the last, partial batch was filled in too


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_unavailable_everywhere(monkeypatch, name):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds_source, "_tensorflow_available", lambda: False)
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(name)
    message = str(err.value)
    assert "\n" not in message
    assert "OAT_DATA_DIR" in message and "tensorflow" in message
    assert "not prepared" in message
    if name == "fashion_mnist":
        assert "dataset-fashion-mnist" in message
    else:
        assert cifar10.ARCHIVE in message


def test_unavailable_without_tfds_installed(monkeypatch):
    # A None entry in sys.modules makes `import tensorflow_datasets` fail.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset("fashion_mnist")
    assert "tensorflow-datasets is not importable" in str(err.value)
    assert "dataset-fashion-mnist" in str(err.value) and "OAT_DATA_DIR" in str(err.value)


@register_dataset("labels_beyond_the_classes_for_tests")
def _labels_beyond_the_classes(data_dir: str, image_size: int = 0) -> Dataset:
    images = np.zeros((3, 4, 4, 1), np.uint8)
    return Dataset(name="labels_beyond_the_classes_for_tests", train_images=images,
                   train_labels=np.array([0, 1, 5], np.int32), test_images=images,
                   test_labels=np.array([0, 1, 2], np.int32), num_classes=3, source="generated by the tests")


def test_labels_outside_the_classes_are_named():
    with pytest.raises(DatasetError, match=r"train split .* label 5 is outside \[0, 3\)"):
        load_dataset("labels_beyond_the_classes_for_tests")
