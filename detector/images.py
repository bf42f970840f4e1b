"""Reading one image, or saying why it cannot be used: the loader shared by detection,
training and chat, so each rejects the same files for the same reasons.

:func:`decode_image` checks, in order: a key refused by :mod:`detector.keys`; the file
(``missing``, ``not_a_file``, ``empty``, ``unreadable``); the header (``unreadable`` for a
format outside :data:`FORMATS`; ``too_large`` when width x height exceeds ``max_pixels``
or Pillow's decompression-bomb limit, decided before any pixel is decoded; ``zero_size``);
then the pixel data (``truncated``). The reasons are :data:`detector.schema.REJECT_REASONS`.

Images are decoded as ``PIL.Image.open(path).convert("RGB")`` (greyscale, palette, CMYK
and alpha images included; no EXIF rotation), the frame the box coordinates refer to.
Decoding is strict whatever ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` says elsewhere in the
process (lmms-eval sets it on import): a cut-short file is ``truncated``, never zero-padded.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from detector.keys import REFUSED_PREFIX

FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF")
"""The formats Pillow may identify a file as: the image extensions detection lists. Other
plugins (EPS runs Ghostscript, for one) never see a corpus file."""


def open_image(fp):
    """``PIL.Image.open`` limited to :data:`FORMATS`, without Ultralytics' patch (which, on an
    unidentified file, tries to install and import ``pi_heif``: that fails offline with an
    ImportError instead of Pillow's error)."""
    opener = Image.open
    module = getattr(opener, "__module__", "") or ""
    if module.startswith("ultralytics"):
        opener = getattr(sys.modules[module], "_image_open", opener)
    return opener(fp, formats=FORMATS)


_STRICT = threading.Lock()


@contextmanager
def _strict_pillow() -> Iterator[None]:
    """Pillow's truncated-file check on, and its bomb warning off (the limit is checked here),
    for one decode; the process-wide setting is restored after it."""
    with _STRICT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


@dataclass
class DecodedImage:
    image: Image.Image  # RGB
    data: bytes  # the file's bytes


@dataclass
class LoadedImage:
    key: str
    path: str
    sha256: str
    width: int
    height: int
    array: np.ndarray  # H x W x 3, uint8, BGR (what Ultralytics expects of numpy input)


@dataclass
class Rejected:
    key: str
    path: str
    reason: str  # one of schema.REJECT_REASONS
    detail: str


def _read(key: str, path: str) -> bytes | Rejected:
    if path.startswith(REFUSED_PREFIX):
        reason, _, detail = path[len(REFUSED_PREFIX):].partition(":")
        return Rejected(key, "", reason, detail)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return Rejected(key, path, "not_a_file", "not a regular file")
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return Rejected(key, path, "missing", f"no such file: {path}")
    except (OSError, ValueError) as exc:
        return Rejected(key, path, "unreadable", f"{type(exc).__name__}: {exc}")
    return data or Rejected(key, path, "empty", "file has 0 bytes")


def decode_image(key: str, path: str, max_pixels: int) -> DecodedImage | Rejected:
    """The RGB image at ``path`` (image key ``key``) and its bytes, or why it cannot be used."""
    data = _read(key, path)
    if isinstance(data, Rejected):
        return data
    with _strict_pillow():
        return _decode(key, path, data, max_pixels)


def _decode(key: str, path: str, data: bytes, max_pixels: int) -> DecodedImage | Rejected:
    try:
        im = open_image(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        return Rejected(key, path, "too_large", str(exc))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, ImportError) as exc:
        return Rejected(key, path, "unreadable", f"{type(exc).__name__}: {exc}")
    # not closed (the stream is the bytes in memory): an RGB file's decoded image is returned as it is,
    # without the copy that convert("RGB") makes of it
    width, height = im.size
    if width <= 0 or height <= 0:
        return Rejected(key, path, "zero_size", f"size {width}x{height}")
    if width * height > max_pixels:
        return Rejected(key, path, "too_large", f"{width}x{height} = {width * height} pixels > {max_pixels}")
    try:
        im.load()
        rgb = im if im.mode == "RGB" else im.convert("RGB")
    except Exception as exc:  # truncated streams, broken zlib/JPEG data...
        return Rejected(key, path, "truncated", f"{type(exc).__name__}: {exc}")
    return DecodedImage(rgb, data)


def load_image(key: str, path: str, max_pixels: int) -> LoadedImage | Rejected:
    """Detection's view of :func:`decode_image`: BGR pixels and the file's sha256."""
    decoded = decode_image(key, path, max_pixels)
    if isinstance(decoded, Rejected):
        return decoded
    import cv2  # Ultralytics' dependency; a contiguous BGR copy several times faster than numpy's [..., ::-1]

    bgr = cv2.cvtColor(np.asarray(decoded.image), cv2.COLOR_RGB2BGR)
    width, height = decoded.image.size
    return LoadedImage(key, path, hashlib.sha256(decoded.data).hexdigest(), width, height, bgr)
