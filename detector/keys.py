"""Image keys: the one normaliser shared by detection, training, evaluation and the box-file import.

An image key is an image's path relative to the image root, in POSIX form
(``train/000000.png``): box rows are joined on it. :func:`normalize_key` turns a corpus'
``image`` value into its key, or says why the value is refused:

- backslashes become slashes, and ``.`` segments and repeated slashes go:
  ``./img/a.png``, ``img//a.png`` and ``img\\a.png`` all give ``img/a.png``;
- a value that is not a non-empty string (a list, a number, an object, ``""``), or that
  holds a NUL byte, is refused as ``malformed_image_field``;
- an absolute path is refused as ``absolute_path``, unless absolute paths are allowed
  (``data.allow_absolute_image_paths``): then its key is the normalised absolute path;
- a key whose ``..`` segments leave the root is refused as ``path_escapes_root`` (always).

:func:`resolve_key` also follows symbolic links: with absolute paths off, the file a key
names must lie under the image root once both are resolved (``path_escapes_root``
otherwise), so a link inside the root cannot lead out of it.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

REFUSAL_REASONS = {
    "malformed_image_field": "the record's 'image' is not a non-empty string (a list, number, object...)",
    "absolute_path": "the image path is absolute and data.allow_absolute_image_paths is off",
    "path_escapes_root": "the image path leads outside the image root ('..' or a symbolic link)",
}


@dataclass(frozen=True)
class KeyRefused:
    """An ``image`` value that gives no usable key: the value as text, and why."""

    key: str
    reason: str  # one of REFUSAL_REASONS
    detail: str


def normalize_key(value, allow_absolute: bool = False) -> str | KeyRefused:
    """The image key of a corpus ``image`` value, or why it is refused (see the module docstring).
    A malformed value's ``KeyRefused.key`` is its JSON text (``7``, ``[\"a.png\"]``, ``\"\"``)."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        text = json.dumps(value, default=str)[:200]
        kind = type(value).__name__ if not isinstance(value, str) else "empty or NUL-holding string"
        return KeyRefused(text, "malformed_image_field",
                          f"'image' must be a non-empty path string, got {kind}: {text[:80]}")
    text = value.replace("\\", "/").strip()
    key = posixpath.normpath(text)
    if text.startswith("/"):
        if not allow_absolute:
            return KeyRefused(text, "absolute_path",
                              f"absolute image path {text!r} (data.allow_absolute_image_paths is off)")
        return key
    if key == ".." or key.startswith("../"):
        return KeyRefused(text, "path_escapes_root", f"image path {text!r} leads outside the image root")
    return key


def resolve_key(root: str | Path, key: str, allow_absolute: bool = False) -> Path | KeyRefused:
    """The file of a normalised ``key`` under ``root``; refused if, with symbolic links
    followed, it lies outside the resolved root (checked only when absolute paths are off)."""
    path = Path(root) / key
    if allow_absolute:
        return path
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        return KeyRefused(key, "path_escapes_root",
                          f"image {key!r} resolves to {real}, outside the image root {real_root}")
    return path


REFUSED_PREFIX = "refused:"
"""How detection carries a refused key through its plan: the ``path`` column of a refused
reference holds ``refused:<reason>:<detail>`` (a real path there is always absolute), which
:func:`detector.images.load_image` turns into that reject."""


def refused_path(refused: KeyRefused) -> str:
    return f"{REFUSED_PREFIX}{refused.reason}:{refused.detail}"
