"""Reading one image for detection, or saying why it cannot be used.

Boxes are in the pixel frame of ``PIL.Image.open(path).convert("RGB")``, which
is how the training side reads images (no EXIF rotation is applied).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError


def _pil_open(fp):
    """``PIL.Image.open`` without Ultralytics' patch (which, on an unidentified file, tries to
    install and import ``pi_heif``: that fails offline with an ImportError instead of Pillow's error)."""
    opener = Image.open
    module = getattr(opener, "__module__", "") or ""
    if module.startswith("ultralytics"):
        opener = getattr(sys.modules[module], "_image_open", opener)
    return opener(fp)


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


def load_image(key: str, path: str, max_pixels: int) -> LoadedImage | Rejected:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Rejected(key, path, "missing", f"no such file: {path}")
    except OSError as exc:
        return Rejected(key, path, "unreadable", f"stat failed: {exc}")
    if not stat.S_ISREG(st.st_mode):
        return Rejected(key, path, "not_a_file", "not a regular file")
    if st.st_size == 0:
        return Rejected(key, path, "empty", "file has 0 bytes")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return Rejected(key, path, "unreadable", f"read failed: {exc}")
    if not data:
        return Rejected(key, path, "empty", "file has 0 bytes")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = _pil_open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        return Rejected(key, path, "too_large", str(exc))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, ImportError) as exc:
        return Rejected(key, path, "unreadable", f"{type(exc).__name__}: {exc}")
    width, height = im.size
    if width <= 0 or height <= 0:
        return Rejected(key, path, "zero_size", f"size {width}x{height}")
    if width * height > max_pixels:
        return Rejected(key, path, "too_large", f"{width}x{height} = {width * height} pixels > {max_pixels}")
    try:
        rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:  # truncated streams, broken zlib/JPEG data...
        return Rejected(key, path, "truncated", f"{type(exc).__name__}: {exc}")
    finally:
        im.close()
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    return LoadedImage(key, path, digest, width, height, bgr)
