"""A long-tailed training set for any dataset: the exponential profile of the long-tailed CIFAR benchmarks
(Cui et al., CVPR 2019), class i keeping n_max·ρ^(−i/(C−1)) of its images, in label order.

It is drawn after the validation split (``holdout``), so the validation set stays balanced; the test set is
untouched.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from oat_jax.data import Dataset


def long_tail_counts(available: np.ndarray, ratio: float) -> np.ndarray:
    """How many images each class keeps: n_max·ρ^(−i/(C−1)), n_max the largest class, rounded down, at least
    one and at most what the class has."""
    classes = len(available)
    exponents = np.arange(classes) / max(classes - 1, 1)
    wanted = np.floor(available.max() * ratio ** -exponents + 1e-9).astype(np.int64)
    return np.clip(wanted, 1, available)


def apply_long_tail(dataset: Dataset, ratio: float, seed: int) -> Dataset:
    """``dataset`` with its training set cut to the long-tailed profile of ``ratio`` = n_max / n_min (1:
    unchanged), each class's images chosen with ``seed`` and kept in the dataset's order."""
    if ratio == 1:
        return dataset
    labels = dataset.train_labels
    counts = long_tail_counts(np.bincount(labels, minlength=dataset.num_classes), ratio)
    rng = np.random.default_rng([seed, 0x7A11])
    kept = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == label))[:counts[label]]
                                   for label in range(dataset.num_classes)]))
    return dataclasses.replace(dataset, train_images=dataset.train_images[kept], train_labels=labels[kept])


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The training set's class frequencies π (C,), float64, summing to 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return counts / counts.sum()


def frequency_groups(prior: np.ndarray) -> dict[str, np.ndarray]:
    """The classes in thirds by training frequency, most frequent first ("many", "medium", "few"; a class
    count not divisible by three gives the first groups one more), ties in label order."""
    order = np.argsort(-prior, kind="stable")
    return dict(zip(("many", "medium", "few"), np.array_split(order, 3)))
