"""In-memory batching: seeded per-epoch orders and fixed-shape uint8 batches (the last padded, so each step
compiles once) with a mask that keeps the padding out of anchors, losses and counts.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """One training epoch's order, a function of (seed, epoch) only, so a resumed run sees the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


# The random streams of the held-out sets' orders, apart from the training epochs' (which count from 1).
TEST_STREAM = 2**31 - 1
VALIDATION_STREAM = 2**31 - 2


def eval_order(num_samples: int, seed: int, shuffle: bool, stream: int = TEST_STREAM) -> np.ndarray:
    """A fixed order of a held-out set: which samples share a batch decides OAT's batch anchors."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, stream]).permutation(num_samples)


def num_batches(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def padded_order(order: np.ndarray, batch_size: int) -> np.ndarray:
    """``order`` padded to whole batches with the last batch's first sample (positions from ``len(order)`` on
    are masked wherever batches are cut from it)."""
    padding = num_batches(len(order), batch_size) * batch_size - len(order)
    return np.concatenate([order, np.full(padding, order[(len(order) - 1) // batch_size * batch_size])])


def batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray,
            batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (images (B, H, W, C) uint8, labels (B,) int32, mask (B,) bool) in ``order``, the last padded."""
    padded = padded_order(order, batch_size)
    for start in range(0, len(padded), batch_size):
        index = padded[start:start + batch_size]
        yield images[index], labels[index].astype(np.int32), start + np.arange(batch_size) < len(order)


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 images (N, H, W, C), on the [0, 1] scale."""
    mean = np.zeros(images.shape[-1])
    square = np.zeros(images.shape[-1])
    per_chunk = max(1, 2**22 // max(1, images[0].size))  # about 32 MB of float64 a chunk, whatever the size
    for chunk in np.array_split(images, max(1, len(images) // per_chunk)):
        pixels = chunk.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        mean += pixels.sum(axis=0)
        square += np.square(pixels).sum(axis=0)
    count = images.size // images.shape[-1]
    mean /= count
    std = np.sqrt(np.maximum(square / count - np.square(mean), 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)
