"""Tests for the class-folder datasets (image_folder, era, bar), video middle frames and the decoded-data cache.

Every image, video and folder is generated in tmp_path; the cache lives there too.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from oat_jax.data import DatasetError, DatasetUnavailable, cache, image_folder, load_dataset, locations
from oat_jax.data.video import read_middle_frame
from conftest import COLOURS, colour_index, write_image, write_video

pytestmark = pytest.mark.usefixtures("isolated_data")  # only this test's data and cache are visible







# ---------------------------------------------------------------- helpers








def pil_resized(path, size):
    """What torchvision's ImageFolder + Resize((size, size)) gives for this file."""
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def make_folders(root, classes=("cat", "dog"), per_class=(2, 1), size=(20, 30)):
    """root/train/<class>/<i>.png and root/test/<class>/<i>.png; returns root."""
    for split, count in zip(("train", "test"), per_class):
        for c, name in enumerate(classes):
            for i in range(count):
                write_image(root / split / name / f"{i}.png", size, seed=100 * c + 10 * i + len(split))
    return root


# ---------------------------------------------------------------- image_folder


def test_image_folder_sizes_labels_and_class_order(tmp_path):
    root = tmp_path / "ds"
    # Classes sort as torchvision sorts them: by code point, upper case first.
    write_image(root / "train" / "b_cat" / "x.jpg", (50, 40), seed=1)
    write_image(root / "train" / "b_cat" / "nested" / "y.PNG", (33, 21), mode="L", seed=2)  # gray, upper-case
    write_image(root / "train" / "a_dog" / "z.png", (20, 30), mode="RGBA", seed=3)
    write_image(root / "train" / "a_dog" / "w.gif", (25, 25), mode="P", seed=4)
    write_image(root / "train" / "Upper" / "v.bmp", (12, 17), seed=5)
    (root / "train" / "a_dog" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    for name in ("Upper", "a_dog", "b_cat"):
        write_image(root / "test" / name / "t.webp", (16, 16), seed=len(name))

    ds = load_dataset("image_folder", str(root), image_size=24)
    assert ds.name == "image_folder" and ds.num_classes == 3 and ds.source == str(root)
    assert ds.train_images.shape == (5, 24, 24, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (3, 24, 24, 3)
    assert ds.train_labels.dtype == np.int32
    # Upper=0, a_dog=1 (w.gif, z.png), b_cat=2 (x.jpg, then nested/y.PNG)
    assert ds.train_labels.tolist() == [0, 1, 1, 2, 2]
    assert ds.test_labels.tolist() == [0, 1, 2]
    expected = [root / "train" / p for p in ("Upper/v.bmp", "a_dog/w.gif", "a_dog/z.png", "b_cat/x.jpg",
                                             "b_cat/nested/y.PNG")]
    for got, path in zip(ds.train_images, expected):
        np.testing.assert_array_equal(got, pil_resized(path, 24))


def test_stored_size_kept_when_all_equal(tmp_path):
    root = make_folders(tmp_path / "ds", size=(20, 30))
    ds = load_dataset("image_folder", str(root))
    assert ds.train_images.shape == (4, 20, 30, 3)
    np.testing.assert_array_equal(ds.train_images[0], np.asarray(Image.open(root / "train" / "cat" / "0.png")))


def test_mixed_sizes_need_image_size(tmp_path):
    root = make_folders(tmp_path / "ds")
    odd = write_image(root / "train" / "dog" / "9.png", (21, 30))
    with pytest.raises(DatasetError) as err:
        load_dataset("image_folder", str(root))
    assert str(odd) in str(err.value) and "image_size" in str(err.value)


def test_train_test_class_mismatch(tmp_path):
    root = make_folders(tmp_path / "ds")
    write_image(root / "test" / "zebra" / "0.png")
    with pytest.raises(DatasetError) as err:
        load_dataset("image_folder", str(root))
    assert "zebra" in str(err.value) and "only in test/" in str(err.value)


def test_image_folder_needs_data_dir(tmp_path):
    with pytest.raises(DatasetError, match="image_folder needs data_dir"):
        load_dataset("image_folder")
    with pytest.raises(DatasetError, match="train/<class>"):
        load_dataset("image_folder", str(tmp_path))


def test_empty_class_folder(tmp_path):
    root = make_folders(tmp_path / "ds")
    (root / "train" / "empty").mkdir()
    (root / "test" / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no image or video files"):
        load_dataset("image_folder", str(root))


@pytest.mark.parametrize(
    "content", [b"definitely not a jpeg", b"\xff\xd8\xff\xe0" + b"\0" * 40], ids=["garbage", "cut-header"]
)
def test_corrupt_image_names_the_file(tmp_path, content):
    root = make_folders(tmp_path / "ds")
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(content)
    with pytest.raises(DatasetError) as err:
        load_dataset("image_folder", str(root), image_size=8)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_truncated_png_names_the_file(tmp_path):
    root = make_folders(tmp_path / "ds")
    good = write_image(root / "train" / "cat" / "big.png", (20, 30))
    good.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(DatasetError, match="big.png"):
        load_dataset("image_folder", str(root), image_size=8)


# ---------------------------------------------------------------- ERA and BAR


@pytest.mark.parametrize(
    "name, title, publication",
    [("era", "ERA", "lcmou.github.io/ERA_Dataset"), ("bar", "BAR", "github.com/alinlab/BAR")],
)
def test_published_dataset_missing(name, title, publication):
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(name)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{title} not found") and publication in message
    assert "Mou et al." in message if name == "era" else "Nam et al." in message
    assert "train/<class>" in message and f"{locations.SYSTEM_DIR}/{name}" in message and "OAT_DATA_DIR" in message


def test_published_explicit_dir_without_copy(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("era", str(tmp_path))
    assert not isinstance(err.value, DatasetUnavailable) and str(tmp_path) in str(err.value)


def test_era_from_env_checks_class_count(tmp_path, monkeypatch):
    make_folders(tmp_path / "data" / "era", per_class=(1, 1))
    monkeypatch.setenv("OAT_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DatasetError, match="ERA has 25 classes, but train/ holds 2"):
        load_dataset("era", image_size=8)


def test_era_from_system_dir_with_videos_and_capitalised_splits(tmp_path, monkeypatch):
    root = tmp_path / "system" / "era"
    classes = [f"event{i:02d}" for i in range(25)]
    for c, name in enumerate(classes):
        write_image(root / "Train" / name / "a.jpg", (12, 14), seed=c)
        write_image(root / "Test" / name / "b.png", (9, 9), seed=c + 50)
    write_video(root / "Train" / "event03" / "clip.mp4", codec="libx264")
    monkeypatch.setattr(locations, "SYSTEM_DIR", str(tmp_path / "system"))
    ds = load_dataset("era", image_size=10)
    assert ds.num_classes == 25 and ds.source == str(root)
    assert ds.train_images.shape == (26, 10, 10, 3) and ds.test_images.shape == (25, 10, 10, 3)
    assert ds.train_labels[3:5].tolist() == [3, 3]
    assert colour_index(ds.train_images[4]) == 3  # the middle one of 7 frames


def test_bar_published_flat_layout(tmp_path, monkeypatch):
    root = tmp_path / "data" / "bar"
    actions = ["climbing", "diving", "fishing", "racing", "throwing", "vaulting"]
    for c, action in enumerate(actions):
        write_image(root / "train" / f"{action}_{c}.jpg", (30, 20), seed=c)
        write_image(root / "train" / f"{action}_{c + 10}.jpg", (18, 25), seed=c + 10)
        write_image(root / "test" / f"{action}_{c + 20}.jpg", (22, 22), seed=c + 20)
    monkeypatch.setenv("OAT_DATA_DIR", str(tmp_path / "data"))
    ds = load_dataset("bar", image_size=12)
    assert ds.num_classes == 6
    assert ds.train_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert ds.test_labels.tolist() == list(range(6))
    np.testing.assert_array_equal(ds.test_images[2], pil_resized(root / "test" / "fishing_22.jpg", 12))


# ---------------------------------------------------------------- video middle frame


@pytest.mark.parametrize("codec, suffix", [("mpeg4", ".avi"), ("libx264", ".mp4")])
@pytest.mark.parametrize("frames", [7, 6, 1])
def test_middle_frame_is_frame_n_over_2(tmp_path, codec, suffix, frames):
    path = write_video(tmp_path / f"clip{suffix}", COLOURS[:frames], codec=codec)
    image = read_middle_frame(str(path), 0)
    assert image.shape == (40, 48, 3) and image.dtype == np.uint8
    assert colour_index(image) == frames // 2


def test_middle_frame_resized(tmp_path):
    image = read_middle_frame(str(write_video(tmp_path / "clip.avi")), 16)
    assert image.shape == (16, 16, 3) and colour_index(image) == 3


def test_corrupt_video_names_the_file(tmp_path):
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"RIFF" + os.urandom(300))
    with pytest.raises(DatasetError) as err:
        read_middle_frame(str(bad), 8)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_video_without_pyav(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.avi")
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    with pytest.raises(DatasetError, match="pip install av"):
        read_middle_frame(str(path), 8)


# ---------------------------------------------------------------- cache


def _fail(*args):
    raise AssertionError("decoded again instead of reading the cache")


def test_cache_is_reused(tmp_path, monkeypatch):
    root = make_folders(tmp_path / "ds")
    first = load_dataset("image_folder", str(root), image_size=8)
    monkeypatch.setattr(image_folder, "read_file", _fail)
    second = load_dataset("image_folder", str(root), image_size=8)
    assert isinstance(second.train_images, np.memmap) and not second.train_images.flags.writeable
    np.testing.assert_array_equal(first.train_images, second.train_images)
    np.testing.assert_array_equal(first.test_labels, second.test_labels)
    folders = os.listdir(tmp_path / "cache")
    assert len(folders) == 1 and folders[0].startswith("image_folder-8px-")
    assert sorted(os.listdir(tmp_path / "cache" / folders[0])) == [
        "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]
    # Another size is another cache entry, decoded afresh.
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("image_folder", str(root), image_size=9)


def test_cache_invalidated_when_a_file_changes(tmp_path):
    root = make_folders(tmp_path / "ds")
    before = load_dataset("image_folder", str(root), image_size=8)
    changed = write_image(root / "test" / "dog" / "0.png", (20, 30), seed=999)
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    after = load_dataset("image_folder", str(root), image_size=8)
    np.testing.assert_array_equal(after.test_images[1], pil_resized(changed, 8))
    assert not np.array_equal(before.test_images[1], after.test_images[1])
    assert len(os.listdir(tmp_path / "cache")) == 1  # the stale entry was removed


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    root = make_folders(tmp_path / "ds")
    calls = []
    original = image_folder.read_file

    def interrupted(path, size):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return image_folder.read_image(path, size)

    monkeypatch.setattr(image_folder, "read_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("image_folder", str(root), image_size=8)
    assert os.listdir(tmp_path / "cache") == []
    monkeypatch.setattr(image_folder, "read_file", original)
    assert load_dataset("image_folder", str(root), image_size=8).train_images.shape == (4, 8, 8, 3)


def test_partial_folder_of_a_dead_run_is_removed(tmp_path):
    root = make_folders(tmp_path / "ds")
    load_dataset("image_folder", str(root), image_size=8)
    (entry,) = os.listdir(tmp_path / "cache")
    dead = tmp_path / "cache" / f"{entry}{cache._PARTIAL}999999999"  # no such pid
    dead.mkdir()
    write_image(root / "train" / "cat" / "new.png", (20, 30), seed=7)  # forces a rebuild
    assert len(load_dataset("image_folder", str(root), image_size=8).train_labels) == 5
    assert len(os.listdir(tmp_path / "cache")) == 1 and not dead.exists()


def test_memmaps_through_limits(tmp_path):
    root = make_folders(tmp_path / "ds", per_class=(3, 2))
    load_dataset("image_folder", str(root), image_size=8)
    ds = load_dataset("image_folder", str(root), train_limit=4, test_limit=1, image_size=8)
    assert isinstance(ds.train_images, np.memmap)
    assert ds.train_images.shape == (4, 8, 8, 3) and ds.train_labels.tolist() == [0, 0, 0, 1]
    assert ds.test_images.shape == (1, 8, 8, 3) and ds.test_labels.dtype == np.int32
    batch = ds.train_images[np.array([3, 0])]  # what the training loop does with them
    assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.uint8
