"""CIFAR-10 (32x32x3, 10 classes) from the standard python archive or tensorflow-datasets.

The local copy is ``cifar-10-python.tar.gz`` as published, either the archive
itself (read in place with tarfile) or its extracted ``cifar-10-batches-py``
folder. Search order: the explicit ``data_dir`` (an error if it holds no
copy, so a typo cannot load other data), then ``$OAT_DATA_DIR``, then
tensorflow-datasets.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np

from oat_jax.data import Dataset, DatasetError, DatasetUnavailable, register_dataset
from oat_jax.data import tfds_source

NAME = "cifar10"
NUM_CLASSES = 10
ENV_VAR = "OAT_DATA_DIR"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_ROW = 3 * 32 * 32  # one image, channel-major (all R, then G, then B)

HOW_TO_GET = (
    f"get it by one of: downloading {ARCHIVE} from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and setting "
    f"{ENV_VAR} or the config's data_dir to it or to the folder holding it (or its "
    f"extracted {FOLDER} folder); or, with network, installing tensorflow (e.g. "
    "`pip install tensorflow-cpu`) so tensorflow-datasets can download and prepare it"
)


@register_dataset(NAME)
def load(data_dir: str, image_size: int) -> Dataset:
    """Load CIFAR-10; images (N, 32, 32, 3) uint8, labels (N,) int32.

    ``image_size`` is left to ``load_dataset``, which resizes fixed-size images.
    """
    if data_dir:
        base = os.path.expanduser(data_dir)
        copy = find_copy(base)
        if copy is None:
            raise DatasetError(
                f"data_dir {base} does not hold CIFAR-10: expected {ARCHIVE} or the "
                f"{FOLDER} folder (the path itself or inside it); fix data_dir, or "
                f"leave it empty to search ${ENV_VAR} and tensorflow-datasets"
            )
        return _from_copy(copy)

    env = os.path.expanduser(os.environ.get(ENV_VAR, ""))
    copy = find_copy(env) if env else None
    if copy is not None:
        return _from_copy(copy)

    try:
        train_x, train_y, test_x, test_y = tfds_source.load_tfds(NAME, None)
    except DatasetUnavailable as e:
        where = f"${ENV_VAR}={env}" if env else f"${ENV_VAR} (not set)"
        raise DatasetUnavailable(
            f"CIFAR-10 not found: no {ARCHIVE} or {FOLDER} in {where}; {e}; {HOW_TO_GET}"
        ) from None
    return Dataset(
        name=NAME,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        num_classes=NUM_CLASSES,
        source=f"tensorflow-datasets:{NAME}",
    )


def find_copy(base: str) -> str | None:
    """The archive or batches folder at ``base`` or directly inside it, else None."""
    for path in (base, os.path.join(base, ARCHIVE), os.path.join(base, FOLDER)):
        # Any file given is taken as the archive: tarfile then says if it is not.
        if os.path.isfile(path) or os.path.isfile(os.path.join(path, TEST_BATCH)):
            return path
    return None


def _from_copy(path: str) -> Dataset:
    """Read all six batches from an archive or an extracted folder."""
    blobs = _archive_blobs(path) if os.path.isfile(path) else _folder_blobs(path)
    train = [_decode(path, name, blobs[name]) for name in TRAIN_BATCHES]
    test_images, test_labels = _decode(path, TEST_BATCH, blobs[TEST_BATCH])
    return Dataset(
        name=NAME,
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        num_classes=NUM_CLASSES,
        source=path,
    )


def _folder_blobs(folder: str) -> dict[str, bytes]:
    """Raw bytes of each batch file in an extracted folder."""
    blobs = {}
    for name in TRAIN_BATCHES + (TEST_BATCH,):
        file = os.path.join(folder, name)
        try:
            with open(file, "rb") as f:
                blobs[name] = f.read()
        except OSError as e:
            raise DatasetError(f"{file}: cannot read CIFAR-10 batch: {e.strerror or e}") from None
    return blobs


def _archive_blobs(archive: str) -> dict[str, bytes]:
    """Raw bytes of each batch file inside the tar archive, without extracting."""
    wanted = set(TRAIN_BATCHES + (TEST_BATCH,))
    blobs = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if member.isfile() and name in wanted and name not in blobs:
                    blobs[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{archive}: corrupt or unreadable CIFAR-10 archive: {e}") from None
    missing = sorted(wanted - blobs.keys())
    if missing:
        raise DatasetError(f"{archive}: archive lacks {', '.join(missing)} under {FOLDER}/")
    return blobs


def _decode(where: str, name: str, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (images (n, 32, 32, 3) uint8, labels (n,) int32)."""
    file = os.path.join(where, name) if os.path.isdir(where) else f"{where}:{name}"
    try:
        # The batches were pickled by Python 2; "bytes" keeps str keys as bytes.
        batch = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except Exception as e:  # pickle raises many types on garbage
        raise DatasetError(f"{file}: corrupt CIFAR-10 batch: {type(e).__name__}: {e}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise DatasetError(
            f"{file}: expected uint8 data of shape (n, {_ROW}), got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise DatasetError(f"{file}: {len(data)} images but labels of shape {labels.shape}")
    # Rows are CHW; the models take HWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a tampered download
    cannot run arbitrary code the way a plain pickle.load would let it."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)
