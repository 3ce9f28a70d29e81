"""The middle frame of a video file, read with PyAV (an optional dependency).

The middle frame is frame n // 2 of the n frames the stream decodes to.
Container headers often misstate the frame count (AVI and variable-rate MP4
alike), so the whole stream is decoded and counted instead of seeking.
"""

from __future__ import annotations

import collections

import numpy as np

from oat_jax.data import DatasetError
from oat_jax.data.images import error_line, resized

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm")


def read_middle_frame(path: str, size: int) -> np.ndarray:
    """The video's middle frame as (H, W, 3) uint8 RGB, resized to (size, size) unless size is 0.

    Raises DatasetError naming the file when it cannot be decoded or has no
    video frames.
    """
    av = _import_av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DatasetError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame-parallel decoding inside FFmpeg
            frame = _middle(container.decode(stream))
            image = frame.to_image() if frame is not None else None  # RGB PIL image
    except DatasetError:
        raise
    except Exception as e:  # FFmpeg and I/O errors come in many types
        raise DatasetError(f"{path}: cannot decode video: {error_line(e)}") from None
    if image is None:
        raise DatasetError(f"{path}: the video has no decodable frames")
    return resized(image, size)


def _middle(frames):
    """Frame n // 2 of an iterator of n frames; None when it is empty.

    Keeps only the frames that can still be the middle one: as n grows, n // 2
    never moves back, so about half the frames are held, not all of them.
    """
    kept = collections.deque()
    count = 0
    for frame in frames:
        kept.append(frame)
        count += 1
        while len(kept) > count - count // 2:  # kept[0] must be frame count // 2
            kept.popleft()
    return kept[0] if kept else None


def _import_av():
    """The ``av`` module, or a DatasetError saying how to install it."""
    try:
        import av
    except ImportError as e:
        raise DatasetError(f"reading video files needs PyAV, which is not importable ({e}): pip install av") from None
    return av
