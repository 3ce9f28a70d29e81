"""Decoding many files into one stacked, cached array per split.

Files are decoded on a few threads (PIL and FFmpeg release the GIL while
decoding and resizing), in order, straight into the cache's memory-mapped
arrays, with a progress bar on stderr as the training loop has.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from tqdm import tqdm

from oat_jax.data import Dataset, DatasetError, cache

# (name for messages, what the decoder reads: a path, or encoded bytes)
Item = tuple[str, object]
# (name, payload) -> (H, W, C) uint8 image; raises DatasetError naming it when it cannot
Decoder = Callable[[str, object], np.ndarray]
T = TypeVar("T")
R = TypeVar("R")

_MAX_THREADS = 8


def dataset_from_files(
    name: str,
    root: str,
    splits: dict[str, list[tuple[str, int]]],
    num_classes: int,
    image_size: int,
    read: Callable[[str, int], np.ndarray],
) -> Dataset:
    """A Dataset from (path, label) lists for "train" and "test", decoded with ``read(path, image_size)``.

    The decoded arrays are cached (see cache.py) under a fingerprint of the
    listed files' paths, labels, sizes and modification times.
    """
    rows = (
        (split, os.path.relpath(path, root), label, *cache.file_stat(path))
        for split, files in splits.items()
        for path, label in files
    )

    def build(writer: cache.ArrayWriter) -> None:
        for split, files in splits.items():
            items = [(path, path) for path, _ in files]
            stack_decoded(
                items, len(items), lambda _, path: read(path, image_size), writer.empty, f"{name} {split}", split
            )
            writer.save(f"{split}_labels", np.array([label for _, label in files], np.int32))

    arrays = cache.load_or_build(name, root, image_size, cache.fingerprint(rows), build)
    return from_arrays(name, arrays, num_classes, root)


def from_arrays(name: str, arrays: dict[str, np.ndarray], num_classes: int, source: str) -> Dataset:
    """A Dataset from the ``{split}_images`` and ``{split}_labels`` arrays of a cache folder."""
    return Dataset(
        name=name,
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
        num_classes=num_classes,
        source=source,
    )


def stack_decoded(
    items: Iterable[Item],
    count: int,
    decode: Decoder,
    new_array: Callable[[str, tuple[int, ...], type], np.ndarray],
    desc: str,
    split: str,
) -> np.ndarray:
    """Decode ``count`` items into ``new_array(f"{split}_images", (count, H, W, C), uint8)``.

    The first image fixes (H, W, C); an image of another shape is an error
    naming it, since only resized images (image_size > 0) can differ in size.
    """
    out = None
    decoded = 0
    progress = tqdm(total=count, desc=f"decoding {desc}", unit="image", disable=None, file=sys.stderr)
    # closing(): an error stops the decoding threads now, not when the traceback is freed.
    results = contextlib.closing(_ordered_map(lambda item: (item[0], decode(*item)), items))
    with progress, results as decoded_items:
        for where, image in decoded_items:
            if decoded == count:
                raise DatasetError(f"{where}: more than the {count} items expected in {desc}")
            if out is None:
                out = new_array(f"{split}_images", (count,) + image.shape, np.uint8)
            elif image.shape != out.shape[1:]:
                raise DatasetError(
                    f"{where}: image of shape {image.shape}, but earlier ones are {out.shape[1:]}; "
                    "set image_size to resize all images to one size"
                )
            out[decoded] = image
            decoded += 1
            progress.update()
    if decoded != count:
        raise DatasetError(f"{desc}: {decoded} items decoded, {count} expected")
    return out


def _ordered_map(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in order, with a bounded number of items in flight
    (``Executor.map`` would read every item, e.g. every encoded record, up front)."""
    workers = min(_MAX_THREADS, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # on an error, do not decode the rest
            for future in pending:
                future.cancel()
