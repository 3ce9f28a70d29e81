"""A disk cache of decoded datasets, so thousands of files are decoded once.

Each (dataset, source path, image size, fingerprint of the source files) gets
its own folder under ``$OAT_CACHE_DIR`` (default ``~/.cache/oat_jax``) holding
one ``.npy`` file per array. Arrays are written into a temporary folder that
is renamed into place when complete, so a run killed while decoding never
leaves a half-written cache; later runs map the files read-only
(``np.load(mmap_mode="r")``) and start at once. A changed file changes the
fingerprint, hence the folder: the stale one is removed when the new one is
built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Callable, Iterable, Sequence

import numpy as np

from oat_jax.data import DatasetError

ENV_VAR = "OAT_CACHE_DIR"
DEFAULT_ROOT = os.path.join("~", ".cache", "oat_jax")
# Part of every key: bump it when decoding changes, so no run reuses arrays made the old way.
FORMAT_VERSION = 1
_PARTIAL = ".partial-"


class ArrayWriter:
    """Creates the arrays of one cache folder being built."""

    def __init__(self, folder: str):
        self._folder = folder
        self._maps: list[np.memmap] = []

    def empty(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A writable array backed by ``<name>.npy``, to be filled in place (no copy in memory)."""
        array = np.lib.format.open_memmap(self._path(name), mode="w+", dtype=dtype, shape=shape)
        self._maps.append(array)
        return array

    def save(self, name: str, array: np.ndarray) -> None:
        """Write a small, already complete array as ``<name>.npy``."""
        np.save(self._path(name), array)

    def flush(self) -> None:
        for array in self._maps:
            array.flush()
        self._maps.clear()

    def _path(self, name: str) -> str:
        return os.path.join(self._folder, name + ".npy")


def fingerprint(entries: Iterable[Sequence]) -> str:
    """A hex digest of ``entries`` (e.g. (relative path, label, size, mtime) rows), order included."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(repr(tuple(entry)).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def file_stat(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a source file, for a fingerprint; DatasetError naming it if absent."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise DatasetError(f"{path}: listed in the dataset but cannot be read: {e.strerror or e}") from None
    return stat.st_size, stat.st_mtime_ns


def load_or_build(
    dataset: str, source: str, image_size: int, files: str, build: Callable[[ArrayWriter], None]
) -> dict[str, np.ndarray]:
    """The cached arrays (name -> read-only memmap) for this key, building them first if needed.

    ``files`` is the fingerprint of the source files; ``build`` fills an
    ArrayWriter and is called only when no complete cache exists.
    """
    root = cache_root()
    prefix = _key_prefix(dataset, source, image_size)
    folder = os.path.join(root, prefix + files[:16])
    arrays = _load(folder)
    if arrays is not None:
        return arrays

    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise DatasetError(
            f"cannot create the dataset cache folder {root}: {e.strerror or e}; "
            f"set ${ENV_VAR} to a writable folder"
        ) from None
    _remove_stale(root, prefix)
    partial = folder + _PARTIAL + str(os.getpid())
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        writer = ArrayWriter(partial)
        build(writer)
        writer.flush()
        _publish(partial, folder)
    except BaseException:  # Ctrl-C included: leave no partial folder behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    arrays = _load(folder)
    if arrays is None:
        raise DatasetError(f"the dataset cache {folder} could not be read back after writing it")
    return arrays


def cache_root() -> str:
    """Where cache folders live: ``$OAT_CACHE_DIR``, else ``~/.cache/oat_jax``."""
    return os.path.expanduser(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _key_prefix(dataset: str, source: str, image_size: int) -> str:
    """Readable folder-name prefix shared by every fingerprint of one (dataset, source, size)."""
    key = f"{FORMAT_VERSION}\0{dataset}\0{os.path.abspath(source)}\0{image_size}"
    size = f"{image_size}px" if image_size else "stored-size"
    return f"{dataset}-{size}-{hashlib.sha256(key.encode()).hexdigest()[:12]}-"


def _load(folder: str) -> dict[str, np.ndarray] | None:
    """All arrays of a complete cache folder, memory-mapped; None if absent or unreadable."""
    if not os.path.isdir(folder):
        return None
    try:
        return {
            name[: -len(".npy")]: np.load(os.path.join(folder, name), mmap_mode="r")
            for name in sorted(os.listdir(folder))
            if name.endswith(".npy")
        }
    except (OSError, ValueError):  # damaged by hand or by the disk: decode again
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _publish(partial: str, folder: str) -> None:
    """Rename the finished folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(partial, folder)
    except OSError:
        if not os.path.isdir(folder):
            raise
        shutil.rmtree(partial, ignore_errors=True)


def _remove_stale(root: str, prefix: str) -> None:
    """Remove caches of the same (dataset, source, size) made from other files, and partial folders
    of killed runs, which would otherwise pile up (a 224 px UCF-101 is about 2 GB)."""
    for name in os.listdir(root):
        if not name.startswith(prefix):
            continue
        if _PARTIAL in name:
            pid = name.rsplit(_PARTIAL, 1)[1]
            if not (pid.isdigit() and _running(int(pid))):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        else:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether a process with this id exists (assumed so where that cannot be checked)."""
    if os.name != "posix":  # os.kill(pid, 0) is not a probe on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True
