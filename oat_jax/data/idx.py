"""Reader for the IDX format used by (Fashion-)MNIST, plain or gzip-compressed.

Layout: two zero bytes, a dtype code byte, a dimension-count byte, then one
big-endian uint32 per dimension, then the row-major big-endian payload.
Compression is detected from the content, not the file name, because copies
are often renamed (or decompressed while keeping ``.gz``).
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from oat_jax.data import DatasetError

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_BYTES = 4

# IDX dtype code -> big-endian numpy dtype.
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file into a native-endian array of the shape it declares.

    Raises DatasetError naming the file if it is unreadable, not IDX, or its
    payload is shorter or longer than the header promises.
    """
    raw = _read_bytes(path)
    if len(raw) < _HEADER_BYTES:
        raise DatasetError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero1, zero2, code, ndim = raw[:_HEADER_BYTES]
    if zero1 or zero2:
        raise DatasetError(
            f"{path}: not an IDX file (magic {raw[:4].hex()} does not start with 0000)"
        )
    if code not in _DTYPES:
        raise DatasetError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares 0 dimensions")

    dims_end = _HEADER_BYTES + 4 * ndim
    if len(raw) < dims_end:
        raise DatasetError(f"{path}: truncated inside the IDX dimension list")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, _HEADER_BYTES))
    dtype = _DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - dims_end
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: {problem}: header shape {shape} needs {expected} payload "
            f"bytes, file has {actual}"
        )
    # raw is a bytearray, so the result is writable without an extra copy for uint8.
    array = np.frombuffer(raw, dtype, offset=dims_end).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _read_bytes(path: str | os.PathLike) -> bytearray:
    """The file's decompressed content; DatasetError on I/O or gzip failure."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw[:2] != _GZIP_MAGIC:
        return bytearray(raw)
    try:
        return bytearray(gzip.decompress(raw))
    except (OSError, EOFError, zlib.error) as e:
        # BadGzipFile is an OSError; a cut-off stream is an EOFError.
        raise DatasetError(f"{path}: corrupt gzip data: {e}") from None
