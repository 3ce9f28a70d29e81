"""Reading and resizing images the way the paper's torchvision pipeline does.

torchvision's ``ImageFolder`` opens a file with PIL and converts it to RGB;
``Resize((S, S))`` on a PIL image is a plain (not aspect-preserving) PIL
bilinear resize, which antialiases when shrinking. Doing the same here keeps
our 224x224 inputs what the paper's models saw.
"""

from __future__ import annotations

import sys
from typing import IO

import numpy as np
from PIL import Image
from tqdm import tqdm

from oat_jax.data import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

# PIL mode for a channel count of a stored (N, H, W, C) array.
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def read_image(source: str | IO[bytes], size: int, name: str = "") -> np.ndarray:
    """An image file (a path or an open binary file) as (H, W, 3) uint8 RGB,
    resized to (size, size) unless size is 0.

    Grayscale, RGBA and palette images become RGB. Raises DatasetError naming
    the file (``name``, else the path) when PIL cannot read it.
    """
    try:
        with Image.open(source) as image:
            rgb = image.convert("RGB")  # decodes the whole file: a truncated one fails here
    except Exception as e:  # PIL raises many types on garbage
        raise DatasetError(f"{name or source}: cannot read image: {error_line(e)}") from None
    return resized(rgb, size)


def resized(image: Image.Image, size: int) -> np.ndarray:
    """A PIL image as an (H, W, C) uint8 array, resized to (size, size) unless size is 0."""
    if size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """Every image of (N, H, W, C) uint8 ``images`` resized to (size, size).

    Returns ``images`` itself when size is 0 or already theirs. Used for
    datasets stored at one fixed size, whose loaders ignore the requested one.
    """
    if not size or images.shape[1:3] == (size, size):
        return images
    channels = images.shape[-1]
    if channels not in _MODES:
        raise DatasetError(f"cannot resize images with {channels} channels (1, 3 or 4 expected)")
    out = np.empty((len(images), size, size, channels), np.uint8)
    squeeze = channels == 1  # PIL's "L" images have no channel axis
    progress = tqdm(range(len(images)), desc=f"resizing to {size}x{size}", leave=False, disable=None,
                    file=sys.stderr)
    for i in progress:
        pixels = images[i, ..., 0] if squeeze else images[i]
        out[i] = resized(Image.fromarray(pixels, _MODES[channels]), size).reshape(size, size, channels)
    return out


def error_line(e: BaseException) -> str:
    """First line of an exception's message, prefixed with its type."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
