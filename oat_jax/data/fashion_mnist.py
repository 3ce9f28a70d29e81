"""Fashion-MNIST (28x28x1, 10 classes) from local IDX files or tensorflow-datasets.

Search order: the explicit ``data_dir``, then ``$OAT_DATA_DIR``, then the
Debian package's folder (``apt-get install dataset-fashion-mnist``), then
tensorflow-datasets. An explicit ``data_dir`` is never skipped silently: if it
lacks the files that is an error, so a typo cannot load other data.
"""

from __future__ import annotations

import os

import numpy as np

from oat_jax.data import Dataset, DatasetError, DatasetUnavailable, register_dataset
from oat_jax.data import tfds_source
from oat_jax.data.idx import read_idx

NAME = "fashion_mnist"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
# Where Debian's dataset-fashion-mnist package installs the files.
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "OAT_DATA_DIR"

# Role -> file name; each may also carry a ".gz" suffix.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

HOW_TO_GET = (
    "get it by one of: `apt-get install dataset-fashion-mnist` (Debian, installs to "
    f"{DEFAULT_DIR}); setting {ENV_VAR} or the config's data_dir to a folder holding "
    f"the four IDX files ({', '.join(FILES.values())}, each optionally .gz); "
    "or, with network, installing tensorflow (e.g. `pip install tensorflow-cpu`) so "
    "tensorflow-datasets can download and prepare it"
)


@register_dataset(NAME)
def load(data_dir: str, image_size: int) -> Dataset:
    """Load Fashion-MNIST; images (N, 28, 28, 1) uint8, labels (N,) int32.

    ``image_size`` is left to ``load_dataset``, which resizes fixed-size images.
    """
    if data_dir:
        folder = os.path.expanduser(data_dir)
        found, missing = find_files(folder)
        if missing:
            raise DatasetError(
                f"data_dir {folder} does not hold Fashion-MNIST: missing "
                f"{', '.join(missing)} (each may end in .gz); point data_dir at "
                "the folder with the four IDX files, or leave it empty to search "
                f"${ENV_VAR}, {DEFAULT_DIR} and tensorflow-datasets"
            )
        return _from_idx(folder, found)

    searched = []
    for label, folder in ((f"${ENV_VAR}", os.environ.get(ENV_VAR, "")), ("", DEFAULT_DIR)):
        if not folder:
            continue
        folder = os.path.expanduser(folder)
        found, missing = find_files(folder)
        if not missing:
            return _from_idx(folder, found)
        searched.append(f"{label}={folder}" if label else folder)

    try:
        train_x, train_y, test_x, test_y = tfds_source.load_tfds(NAME, None)
    except DatasetUnavailable as e:
        raise DatasetUnavailable(
            f"Fashion-MNIST not found: no IDX files in {', '.join(searched) or 'any folder'}"
            f"; {e}; {HOW_TO_GET}"
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


def find_files(folder: str) -> tuple[dict[str, str], list[str]]:
    """Locate the four IDX files in ``folder``: (role -> path, missing names)."""
    found, missing = {}, []
    for role, name in FILES.items():
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                found[role] = path
                break
        else:
            missing.append(name)
    return found, missing


def _from_idx(folder: str, paths: dict[str, str]) -> Dataset:
    """Read and check the four files found in ``folder``."""
    split = {}
    for part in ("train", "test"):
        images_path, labels_path = paths[f"{part}_images"], paths[f"{part}_labels"]
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
            raise DatasetError(
                f"{images_path}: expected uint8 images of shape (N, 28, 28), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DatasetError(
                f"{labels_path}: expected {len(images)} labels to match "
                f"{os.path.basename(images_path)}, got shape {labels.shape}"
            )
        # Add the channel axis: the models take NHWC.
        split[part] = (images[..., None], labels.astype(np.int32))
    return Dataset(
        name=NAME,
        train_images=split["train"][0],
        train_labels=split["train"][1],
        test_images=split["test"][0],
        test_labels=split["test"][1],
        num_classes=NUM_CLASSES,
        source=folder,
    )
