"""Image-classification datasets as numpy arrays, looked up by name.

Each dataset lives in its own module, which registers a loader with
``@register_dataset("name")``; ``load_dataset`` then finds it by name, applies
sample limits, resizes images when asked and checks what the loader returned,
so that a broken local copy fails here with one clear line instead of deep
inside training.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Both splits of one dataset.

    Images are NHWC uint8 so that scaling/normalisation stays the model side's
    choice; labels are int32 class indices in [0, num_classes). Arrays are in
    memory or read-only ``np.memmap``s of a decoded-dataset cache (see
    ``cache.py``): users only index them.
    """

    name: str
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (M, H, W, C) uint8
    test_labels: np.ndarray  # (M,) int32
    num_classes: int
    source: str  # where it was read from: a path, or "tensorflow-datasets:<name>"
    # Held out from the training set by ``holdout.hold_out_validation`` (None: no validation split).
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None


class DatasetError(Exception):
    """A problem the user can fix; ``str(e)`` is one line saying what and how."""


class DatasetUnavailable(DatasetError):
    """The dataset was found nowhere; the message lists every way to obtain it."""


Loader = Callable[[str, int], Dataset]
_LOADERS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator registering ``fn(data_dir: str, image_size: int) -> Dataset`` under ``name``.

    ``image_size`` (0 = as stored) is the square size asked for. Loaders of
    images of differing sizes must resize while reading, to stack them; a
    loader of fixed-size images may ignore it: ``load_dataset`` resizes them.
    """

    def decorate(fn: Loader) -> Loader:
        # Two modules claiming one name is a programming error, not a user one.
        if name in _LOADERS:
            raise ValueError(f"dataset {name!r} is registered twice")
        _LOADERS[name] = fn
        return fn

    return decorate


def dataset_names() -> list[str]:
    """Names accepted by ``load_dataset``, sorted."""
    return sorted(_LOADERS)


def load_dataset(
    name: str, data_dir: str = "", train_limit: int = 0, test_limit: int = 0, image_size: int = 0
) -> Dataset:
    """Load dataset ``name``, keeping the first ``*_limit`` samples (0 = all).

    ``data_dir`` ("" = not given) is passed to the dataset's loader, which
    decides how to search for it. ``image_size`` 0 keeps the stored size;
    otherwise every image becomes image_size x image_size (a plain bilinear,
    antialiased resize, as torchvision's ``Resize((S, S))`` on PIL images).
    Raises DatasetError on any user-fixable problem (unknown name, bad limit,
    malformed data).
    """
    if name not in _LOADERS:
        known = ", ".join(dataset_names()) or "none"
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known}")
    for what, value, zero in (
        ("train_limit", train_limit, "all samples"),
        ("test_limit", test_limit, "all samples"),
        ("image_size", image_size, "as stored"),
    ):
        if value < 0:
            raise DatasetError(f"{what} must be >= 0 (0 = {zero}), got {value}")

    ds = _LOADERS[name](data_dir, image_size)
    train_images, train_labels = _checked_split(
        ds, "train", ds.train_images, ds.train_labels
    )
    test_images, test_labels = _checked_split(ds, "test", ds.test_images, ds.test_labels)
    # Limits first, so a quick run resizes only the images it keeps.
    return dataclasses.replace(
        ds,
        train_images=resize_all(_first(train_images, train_limit), image_size),
        train_labels=_first(train_labels, train_limit),
        test_images=resize_all(_first(test_images, test_limit), image_size),
        test_labels=_first(test_labels, test_limit),
    )


def _first(array: np.ndarray, limit: int) -> np.ndarray:
    """The first ``limit`` rows of ``array``; all of them when limit is 0."""
    return array[:limit] if limit else array


def _checked_split(
    ds: Dataset, split: str, images: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one split; return (images (N,H,W,C) uint8, labels (N,) int32)."""
    where = f"{ds.name} {split} split (from {ds.source})"
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(
            f"{where}: images must be 4-D (N, H, W, C) uint8, "
            f"got shape {images.shape} dtype {images.dtype}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{where}: labels must be 1-D integers, "
            f"got shape {labels.shape} dtype {labels.dtype}"
        )
    if len(labels) != len(images):
        raise DatasetError(f"{where}: {len(images)} images but {len(labels)} labels")
    bad = labels[(labels < 0) | (labels >= ds.num_classes)]
    if bad.size:
        raise DatasetError(
            f"{where}: label {int(bad[0])} is outside [0, {ds.num_classes}); "
            "the labels file is corrupt or belongs to another dataset"
        )
    return images, labels.astype(np.int32, copy=False)


# Filling the registry: each import registers one or more datasets. These come
# last because the modules import the names defined above.
from oat_jax.data.images import resize_all  # noqa: E402
from oat_jax.data import cifar10, fashion_mnist, image_folder, ucf101  # noqa: E402,F401
from oat_jax.data.holdout import hold_out_validation  # noqa: E402,F401
from oat_jax.data.longtail import apply_long_tail  # noqa: E402,F401
