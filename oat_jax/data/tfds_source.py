"""Fallback source: a dataset prepared by tensorflow-datasets, read without TF.

tfds' ``array_record`` data sources are plain random-access readers, so an
already prepared dataset loads with numpy alone; TensorFlow is only needed to
download and prepare it the first time. tensorflow_datasets is imported inside
the function because it is slow to import and local-file paths never need it.

Before a download, the download hosts get a quick reachability check (see
network.py): without network, tfds would otherwise retry for minutes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np

from oat_jax.data import DatasetError, DatasetUnavailable, network

_BATCH = 1024
_FILE_FORMAT = "array_record"
# Tried when a builder's own download URLs cannot be found: tfds' mirror of
# prepared datasets (gs://tfds-data) and the host of many of its downloads.
FALLBACK_HOSTS = [("storage.googleapis.com", 443)]


@contextlib.contextmanager
def _private_tempdir():
    """tfds' builder makes temporary folders it never removes (DatasetInfo.initialize_from_bucket): give
    them a folder of ours for the duration, and remove it afterwards."""
    folder = tempfile.mkdtemp(prefix="oat_jax_tfds_")
    saved, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(folder, ignore_errors=True)


def load_tfds(
    name: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read tfds dataset ``name`` as (train_images, train_labels, test_images, test_labels).

    Images are (N, H, W, C) uint8, labels (N,) int32. ``data_dir`` None means
    ``$TFDS_DATA_DIR`` if set, else tfds' default (~/tensorflow_datasets).

    Raises DatasetUnavailable with a one-line reason (no "how to fix" advice:
    the calling dataset module adds its own local alternatives) when the data
    is not prepared and cannot be prepared; DatasetError when it is there but
    cannot be read.
    """
    # tfds reads $TFDS_DATA_DIR once at import; reading it here honours a
    # value set later (e.g. by a test or a launcher script).
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    where = data_dir or "the default tensorflow-datasets folder"
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetUnavailable(f"tensorflow-datasets is not importable ({e})") from None

    with _quiet_absl(), _private_tempdir():
        try:
            builder = tfds.builder(name, data_dir=data_dir, file_format=_FILE_FORMAT)
            prepared = builder.is_prepared()
        except Exception as e:  # any tfds failure becomes one line, not a traceback
            raise DatasetError(f"tensorflow-datasets cannot open {name!r}: {_line(e)}") from None

        if not prepared and _tensorflow_available():
            require_network(name, builder)
            # tfds' download manager retries without an overall time limit of
            # its own, so a host that passed the check but then stalls still
            # stalls here; the check above is the only bound on going offline.
            try:
                builder.download_and_prepare(file_format=_FILE_FORMAT)
            except Exception as e:
                raise DatasetUnavailable(
                    f"tensorflow-datasets failed to download and prepare {name!r} "
                    f"in {where}: {_line(e)}"
                ) from None

        # Read even when is_prepared() said no: under tfds.testing.mock_data it
        # always says no, yet the data source works. The read is the real test.
        try:
            train = _read_split(builder, "train")
            test = _read_split(builder, "test")
        except Exception as e:
            if not builder.is_prepared():
                raise DatasetUnavailable(
                    f"tensorflow-datasets has not prepared {name!r} in {where}, and "
                    "TensorFlow, which it needs to download and prepare it, is not installed"
                ) from None
            raise DatasetError(
                f"tensorflow-datasets could not read {name!r} from {where}: {_line(e)}"
            ) from None
    return train + test


def require_network(name: str, builder: Any) -> None:
    """Raise DatasetUnavailable within seconds when none of the hosts ``builder``
    downloads from answers, instead of letting tfds retry for minutes.

    The message is one line without "how to fix" advice, like load_tfds': the
    calling dataset module appends its own offline alternatives.
    """
    # tfds.testing.mock_data swaps in a download_and_prepare that downloads
    # nothing; checking the network for it would fail offline tests for nothing.
    if getattr(builder.download_and_prepare, "__module__", "").startswith("tensorflow_datasets.testing"):
        return
    addresses = network.addresses_of(download_urls(builder)) or FALLBACK_HOSTS
    why = network.unreachable(addresses)
    if why is not None:
        raise DatasetUnavailable(f"no network: tensorflow-datasets cannot download {name!r}: no connection to {why}")


def download_urls(builder: Any) -> list[str]:
    """The URLs ``builder`` downloads from, as recorded in its checksums file; [] when unknown.

    ``builder.url_infos`` reads that file but fails in some tfds versions
    (it imports importlib_resources, which Python >= 3.9 installs lack), so
    the file is also looked for where tfds keeps it: next to the builder's
    code, or under tfds' url_checksums folder for older datasets.
    """
    try:
        return list(builder.url_infos or ())
    except Exception:
        pass
    candidates = []
    with contextlib.suppress(TypeError, OSError):
        candidates.append(os.path.join(os.path.dirname(inspect.getfile(type(builder))), "checksums.tsv"))
    with contextlib.suppress(ImportError, AttributeError):
        import tensorflow_datasets as tfds

        candidates.append(os.path.join(os.path.dirname(tfds.__file__), "url_checksums", f"{builder.name}.txt"))
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as f:
                return [line.split("\t", 1)[0] for line in f if "://" in line and not line.startswith("#")]
        except OSError:
            continue
    return []


def _tensorflow_available() -> bool:
    """True when TensorFlow could be imported (checked without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def _read_split(builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of one split as (images (N,H,W,C) uint8, labels (N,) int32)."""
    source = builder.as_data_source(split=split)
    n = len(source)
    images: np.ndarray | None = None
    labels = np.empty((n,), np.int32)
    batched = hasattr(source, "__getitems__")
    for start in range(0, n, _BATCH):
        keys = list(range(start, min(start + _BATCH, n)))
        examples = None
        if batched:
            try:
                examples = source.__getitems__(keys)
            except TypeError:
                # tfds.testing.mock_data installs an unbound __getitems__ that
                # raises TypeError; one item at a time works everywhere.
                batched = False
        if examples is None:
            examples = [source[k] for k in keys]
        for k, example in zip(keys, examples):
            image = np.asarray(example["image"])
            if images is None:  # shape is only known from the first example
                images = np.empty((n,) + image.shape, np.uint8)
            images[k] = image
            labels[k] = int(example["label"])
    if images is None:
        raise DatasetError(f"split {split!r} is empty")
    return images, labels


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence tfds' absl warnings (e.g. about missing dataset_info.json)
    while it probes; our own exceptions say what matters."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _line(e: BaseException) -> str:
    """First line of an exception's message, prefixed with its type."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
