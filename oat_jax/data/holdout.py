"""A validation split held out from the training set, stratified by class, for any dataset.

The held-out images never reach a training step, an anchor or the normalisation statistics: the
experiment trains on what remains. The split depends on the labels, the size and ``validation_seed`` only,
so every seed of a study holds out the same images.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from oat_jax.data import Dataset, DatasetError


def validation_count(size: float, num_samples: int) -> int:
    """How many samples ``size`` holds out of ``num_samples``: a count (>= 1), or a fraction below 1."""
    if size < 1:
        return int(round(size * num_samples))
    return int(size)


def per_class_counts(labels: np.ndarray, total: int, num_classes: int) -> np.ndarray:
    """How many of each class ``total`` held-out samples take, proportional to the class's share of
    ``labels`` (largest remainders, ties to the lower class), so each class keeps its share."""
    available = np.bincount(labels, minlength=num_classes)
    exact = total * available / len(labels)
    counts = np.floor(exact).astype(np.int64)
    remainders = exact - counts
    for label in sorted(range(num_classes), key=lambda c: (-remainders[c], c))[:total - counts.sum()]:
        counts[label] += 1
    return counts


def stratified_split(labels: np.ndarray, size: float, seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices), each in the dataset's own order: ``size`` samples (a count or a
    fraction) drawn per class with ``seed``. DatasetError when the split would leave a class or the training
    set empty."""
    total = validation_count(size, len(labels))
    if total < 1:
        raise DatasetError(f"validation_size {size:g} holds out no sample of the {len(labels)} training samples; "
                           "choose a larger --config.validation_size (or 0 for none)")
    if total >= len(labels):
        raise DatasetError(f"validation_size {size:g} holds out {total} of the {len(labels)} training samples, "
                           "leaving none to train on; choose a smaller --config.validation_size")
    counts = per_class_counts(labels, total, num_classes)
    rng = np.random.default_rng([seed, 0x7A11D])
    held_out = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if counts[label] and counts[label] >= len(members):
            raise DatasetError(f"validation_size {size:g} would hold out every training sample of class {label}; "
                               "choose a smaller --config.validation_size")
        held_out.append(rng.permutation(members)[:counts[label]])
    validation = np.sort(np.concatenate(held_out)).astype(np.int64)
    training = np.setdiff1d(np.arange(len(labels)), validation)
    return training, validation


def hold_out_validation(dataset: Dataset, size: float, seed: int) -> Dataset:
    """``dataset`` with ``size`` training samples moved to its validation split (``size`` 0: unchanged)."""
    if not size:
        return dataset
    training, validation = stratified_split(dataset.train_labels, size, seed, dataset.num_classes)
    return dataclasses.replace(
        dataset, train_images=dataset.train_images[training], train_labels=dataset.train_labels[training],
        validation_images=dataset.train_images[validation], validation_labels=dataset.train_labels[validation])
