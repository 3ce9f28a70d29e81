"""UCF-101 as images: the middle frame of each video, split 1 (9,537 train / 3,783 test, 101 classes).

The paper trains image classifiers on one frame per video; this module takes
frame n // 2 of the n frames each video decodes to. Decoding 13,320 videos
takes a while, so the middle frames are cached as arrays once (see
cache.py, ``$OAT_CACHE_DIR``) and later runs map them from disk at once.

Two sources, in order:

1. A local copy in the official layout: ``UCF-101/<Class>/v_<Class>_gXX_cYY.avi``
   and ``ucfTrainTestlist/{classInd.txt, trainlist01.txt, testlist01.txt}``
   (from the UCF101 page of the University of Central Florida's CRCV), in
   ``data_dir``, else ``$OAT_DATA_DIR/ucf101``, else ``/usr/share/datasets/ucf101``.
   Labels are classInd.txt's 1-based indices minus one. Videos are read with
   PyAV (``pip install av``).
2. tensorflow-datasets' ``ucf101/ucf101_1_256`` (the same split, videos
   scaled to 256x256 and stored as JPEG frames), read without TensorFlow from
   its prepared files (see tfds_video.py). Preparing it needs TensorFlow,
   ffmpeg and network. Its labels follow tfds' class list.
"""

from __future__ import annotations

import os

from oat_jax.data import Dataset, DatasetError, DatasetUnavailable, register_dataset
from oat_jax.data import locations, stacking, tfds_video
from oat_jax.data.video import read_middle_frame

NAME = "ucf101"
NUM_CLASSES = 101
VIDEOS = "UCF-101"
LISTS = "ucfTrainTestlist"
CLASS_INDEX = "classInd.txt"
SPLIT_LISTS = {"train": "trainlist01.txt", "test": "testlist01.txt"}
TFDS_CONFIG = "ucf101_1_256"
TFDS_MODULE = "tensorflow_datasets.video.ucf101"

OFFICIAL_LAYOUT = (
    f"{VIDEOS}/<Class>/v_<Class>_gXX_cYY.avi and {LISTS}/{{{CLASS_INDEX}, {', '.join(SPLIT_LISTS.values())}}}"
)
HOW_TO_GET = (
    "get it by one of: downloading UCF101.rar and the split files (\"The Train/Test Splits for Action "
    "Recognition on UCF101 data set\") from the UCF101 page of the University of Central Florida's CRCV "
    "(https://www.crcv.ucf.edu/data/UCF101.php), extracting both and putting "
    f"{OFFICIAL_LAYOUT} in {locations.SYSTEM_DIR}/{NAME} or ${locations.ENV_VAR}/{NAME} (or setting the "
    "config's data_dir to that folder); or installing tensorflow and ffmpeg so that tensorflow-datasets can "
    f"download and prepare ucf101/{TFDS_CONFIG} (needs network), into $TFDS_DATA_DIR or ~/tensorflow_datasets"
)


@register_dataset(NAME)
def load(data_dir: str, image_size: int) -> Dataset:
    """Load UCF-101 middle frames; images (N, S, S, 3) uint8 (S = image_size, else the videos' size)."""
    expected = f"{OFFICIAL_LAYOUT}, or a tensorflow-datasets folder with ucf101/{TFDS_CONFIG} prepared"
    root, searched = locations.find_root(NAME, data_dir, _holds_any, expected)
    if root is not None:
        prepared = tfds_video.find_prepared(root, NAME, TFDS_CONFIG)
        if holds_official(root) or prepared is None:
            return _from_official(root, image_size)
        return tfds_video.middle_frames_dataset(NAME, prepared, NUM_CLASSES, image_size)

    tfds_dir = tfds_video.tfds_data_dir()
    prepared = tfds_video.find_prepared(tfds_dir, NAME, TFDS_CONFIG)
    if prepared is None:
        try:
            prepared = tfds_video.prepare(NAME, TFDS_CONFIG, tfds_dir, TFDS_MODULE)
        except DatasetUnavailable as e:
            raise DatasetUnavailable(
                f"UCF-101 not found: no official copy ({VIDEOS}/ and {LISTS}/) in {', '.join(searched)}; {e}; "
                f"{HOW_TO_GET}"
            ) from None
    return tfds_video.middle_frames_dataset(NAME, prepared, NUM_CLASSES, image_size)


def holds_official(root: str) -> bool:
    """Whether ``root`` has the official layout's class index and video folder."""
    return os.path.isfile(os.path.join(root, LISTS, CLASS_INDEX)) and os.path.isdir(os.path.join(root, VIDEOS))


def _holds_any(root: str) -> bool:
    return holds_official(root) or tfds_video.find_prepared(root, NAME, TFDS_CONFIG) is not None


def _from_official(root: str, image_size: int) -> Dataset:
    classes = read_class_index(os.path.join(root, LISTS, CLASS_INDEX))
    splits = {split: read_split_list(root, file, classes) for split, file in SPLIT_LISTS.items()}
    return stacking.dataset_from_files(NAME, root, splits, len(classes), image_size, read_middle_frame)


def read_class_index(path: str) -> list[str]:
    """Class names in label order from classInd.txt ("1 ApplyEyeMakeup" lines, numbered from 1)."""
    classes = []
    for number, line in enumerate(_lines(path), start=1):
        parts = line.split()
        if len(parts) != 2 or parts[0] != str(number):
            raise DatasetError(f"{path}: line {number} is {line!r}; expected '{number} <ClassName>'")
        classes.append(parts[1])
    if not classes:
        raise DatasetError(f"{path}: no classes listed")
    return classes


def read_split_list(root: str, list_name: str, classes: list[str]) -> list[tuple[str, int]]:
    """(video path, label) of each line of a train/test list.

    The label is the class folder's index in classInd.txt; a train list's own
    1-based label must agree with it. Every listed video must exist.
    """
    list_path = os.path.join(root, LISTS, list_name)
    index = {name: label for label, name in enumerate(classes)}
    folded = {name.lower(): label for label, name in enumerate(classes)}
    files = []
    for number, line in enumerate(_lines(list_path), start=1):
        where = f"{list_path} line {number}"
        relative, *rest = line.split()
        folder = relative.replace("\\", "/").split("/")[0]
        label = index.get(folder, folded.get(folder.lower()))
        if label is None:
            raise DatasetError(f"{where}: class folder {folder!r} is not in {CLASS_INDEX}")
        if rest and rest[0] != str(label + 1):
            raise DatasetError(f"{where}: label {rest[0]} but {folder} is class {label + 1} in {CLASS_INDEX}")
        files.append((_video_path(root, relative, list_path), label))
    if not files:
        raise DatasetError(f"{list_path}: no videos listed")
    return files


def _video_path(root: str, relative: str, list_path: str) -> str:
    """The listed video's path; an exact match, else a case-insensitive one in its folder
    (the file names' capitalisation varies between copies, e.g. HandStandPushups)."""
    path = os.path.join(root, VIDEOS, *relative.replace("\\", "/").split("/"))
    if os.path.isfile(path):
        return path
    folder, name = os.path.split(path)
    try:
        matches = [n for n in os.listdir(folder) if n.lower() == name.lower()]
    except OSError:
        matches = []
    if len(matches) != 1:
        raise DatasetError(f"{path}: listed in {list_path} but missing")
    return os.path.join(folder, matches[0])


def _lines(path: str) -> list[str]:
    """The file's non-blank lines, stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
