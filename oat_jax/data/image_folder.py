"""Datasets kept as class folders: the generic "image_folder", and the paper's ERA and BAR.

Layout: ``<root>/train/<class>/<files>`` and ``<root>/test/<class>/<files>``
(``Train``/``Test`` also accepted), read as torchvision's ``ImageFolder``
reads it: the classes are the sorted sub-folder names of train/, and a class
folder's files are found recursively, in sorted order. Image files count by
extension; so do video files, whose middle frame is used (ERA is published
as videos). BAR is also read in its published flat layout, ``train/`` and
``test/`` holding ``<class>_<n>.jpg``. Decoded arrays are cached once (see
cache.py).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from oat_jax.data import Dataset, DatasetError, DatasetUnavailable, register_dataset
from oat_jax.data import locations, stacking
from oat_jax.data.images import IMAGE_EXTENSIONS, read_image
from oat_jax.data.video import VIDEO_EXTENSIONS, read_middle_frame

SPLITS = ("train", "test")
LAYOUT = "train/<class>/<files> and test/<class>/<files>"


@dataclasses.dataclass(frozen=True)
class Published:
    """A published class-folder dataset of the paper."""

    name: str
    title: str
    num_classes: int
    published: str  # where and by whom, for the "not found" message
    flat: bool = False  # also accept train/<class>_<n>.<ext> (BAR's own layout)


ERA = Published(
    name="era",
    title="ERA",
    num_classes=25,
    published=(
        'Mou et al. 2020, "ERA: A Dataset and Deep Learning Benchmark for Event Recognition in Aerial Videos", '
        "on the ERA dataset page https://lcmou.github.io/ERA_Dataset/ (2,864 videos: 1,473 train, 1,391 test)"
    ),
)
BAR = Published(
    name="bar",
    title="BAR",
    num_classes=6,
    published=(
        'Nam et al. 2020, "Learning from Failure: Training Debiased Classifier from Biased Classifier", '
        "as the BAR dataset in the GitHub repository https://github.com/alinlab/BAR (1,941 train, 654 test images)"
    ),
    flat=True,
)


@register_dataset("image_folder")
def load_image_folder(data_dir: str, image_size: int) -> Dataset:
    """Any dataset in the class-folder layout; ``data_dir`` is its root."""
    if not data_dir:
        raise DatasetError(f"dataset image_folder needs data_dir: the folder holding {LAYOUT}")
    root = os.path.expanduser(data_dir)
    if not holds_folders(root):
        raise DatasetError(f"data_dir {root} does not hold an image folder dataset: expected {LAYOUT}")
    return load_folders("image_folder", root, image_size)


def _register(spec: Published) -> None:
    def load(data_dir: str, image_size: int) -> Dataset:
        layout = LAYOUT + (" (or train/ and test/ holding <class>_<n>.jpg)" if spec.flat else "")
        root, searched = locations.find_root(spec.name, data_dir, holds_folders, layout)
        if root is None:
            raise DatasetUnavailable(
                f"{spec.title} not found (searched {', '.join(searched)}); it is published by {spec.published}: "
                f"put its {layout}, {spec.num_classes} classes, in {locations.SYSTEM_DIR}/{spec.name} or "
                f"${locations.ENV_VAR}/{spec.name}, or set the config's data_dir to that folder"
            )
        ds = load_folders(spec.name, root, image_size, flat=spec.flat)
        if ds.num_classes != spec.num_classes:
            raise DatasetError(
                f"{root}: {spec.title} has {spec.num_classes} classes, but train/ holds {ds.num_classes}; "
                "is this another dataset?"
            )
        return ds

    load.__doc__ = f"{spec.title} ({spec.num_classes} classes) from class folders."
    register_dataset(spec.name)(load)


for _spec in (ERA, BAR):
    _register(_spec)


def holds_folders(root: str) -> bool:
    """Whether ``root`` has train/ and test/ folders."""
    return all(split_dir(root, split) for split in SPLITS)


def load_folders(name: str, root: str, image_size: int, flat: bool = False) -> Dataset:
    """Read both splits of the class-folder dataset at ``root``."""
    train_dir, test_dir = (split_dir(root, split) for split in SPLITS)
    flat = flat and not _subfolders(train_dir)
    classes = _flat_classes(train_dir) if flat else _subfolders(train_dir)
    if not classes:
        raise DatasetError(f"{train_dir}: no class folders; expected {LAYOUT}")
    test_classes = _flat_classes(test_dir) if flat else _subfolders(test_dir)
    if test_classes != classes:
        raise DatasetError(
            f"{root}: the test classes differ from the train classes: only in train/: "
            f"{sorted(set(classes) - set(test_classes)) or 'none'}; "
            f"only in test/: {sorted(set(test_classes) - set(classes)) or 'none'}"
        )
    list_split = _list_flat if flat else _list_folders
    splits = {split: list_split(folder, classes) for split, folder in zip(SPLITS, (train_dir, test_dir))}
    return stacking.dataset_from_files(name, root, splits, len(classes), image_size, read_file)


def read_file(path: str, size: int) -> np.ndarray:
    """An image file, or a video file's middle frame, as (H, W, 3) uint8 RGB."""
    if path.lower().endswith(VIDEO_EXTENSIONS):
        return read_middle_frame(path, size)
    return read_image(path, size)


def split_dir(root: str, split: str) -> str | None:
    """``root/split``, matched case-insensitively when the exact name is absent; None if none."""
    exact = os.path.join(root, split)
    if os.path.isdir(exact):
        return exact
    try:
        names = os.listdir(root)
    except OSError:
        return None
    matches = [n for n in names if n.lower() == split and os.path.isdir(os.path.join(root, n))]
    return os.path.join(root, matches[0]) if len(matches) == 1 else None


def _subfolders(folder: str) -> list[str]:
    """Sorted names of the visible sub-folders: the classes."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _is_data_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)


def _list_folders(split_folder: str, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every data file under split_folder/<class>/, class by class, sorted."""
    files = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_folder, name)
        found = [
            os.path.join(folder, file)
            for folder, _, names in sorted(os.walk(class_dir, followlinks=True))
            for file in sorted(names)
            if _is_data_file(file)
        ]
        if not found:
            raise DatasetError(
                f"{class_dir}: no image or video files ({', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})"
            )
        files += [(path, label) for path in found]
    return files


def _flat_class(file: str) -> str:
    """The class of a flat-layout file name: the part before the last underscore."""
    return file.rsplit("_", 1)[0]


def _flat_classes(split_folder: str) -> list[str]:
    return sorted({_flat_class(f) for f in os.listdir(split_folder) if _is_data_file(f) and "_" in f})


def _list_flat(split_folder: str, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of the <class>_<n>.<ext> files directly in split_folder, sorted."""
    index = {name: label for label, name in enumerate(classes)}
    files = sorted(f for f in os.listdir(split_folder) if _is_data_file(f))
    unnamed = [f for f in files if "_" not in f]
    if unnamed:
        raise DatasetError(f"{os.path.join(split_folder, unnamed[0])}: the file name does not start with <class>_")
    return [(os.path.join(split_folder, f), index[_flat_class(f)]) for f in files]
