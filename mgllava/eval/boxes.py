"""Where a benchmark image's boxes come from: the box tables, else the detector (cached).

For each image, in order:

1. the Parquet box table (``detector/SCHEMA.md``) of ``boxes_dir``, joined on the image's
   content hash (``sha256`` of the stored PNG/JPEG bytes: the column the detection stage
   writes) or on an image key (the shapes world's sets hold keys such as
   ``bench/000003.png`` in their image-id columns), normalised as detection keys
   images (:func:`detector.keys.normalize_key`: ``./bench//000003.png`` finds the same row);
2. the on-the-fly detector cache: one small JSON file per image under
   ``<cache_dir>/<detector fingerprint>/``, keyed by the content hash (the bytes' sha256,
   or for an image that has no stored bytes the sha256 of its decoded pixels);
3. the detector itself (:func:`detector.model.get_detector`), on every image of a batch
   that missed both, whose boxes then go into the cache.

The fingerprint covers the detector's weights (file hash, or the model YAML's name: a YAML
builds seeded random weights) and the parameters that decide boxes, so changing either
never reuses stale boxes. With no detector configured, an image without a box row is an
error (``allow_missing=True`` gives it no boxes instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from detector.keys import normalize_key
from detector.tables import Detection
from mgllava.model.boxes import Boxes

log = logging.getLogger(__name__)


_INDEX_CACHE: dict[tuple, tuple[dict, dict]] = {}
_INDEX_LOCK = threading.Lock()


@dataclass
class ImageRef:
    """One image to find boxes for: the decoded image, its stored bytes if known, candidate keys."""

    image: Image.Image
    raw: bytes | None = None
    keys: tuple[str, ...] = ()

    def lookup_keys(self) -> list[str]:
        """The candidate keys, normalised; a key the normaliser refuses finds nothing. Absolute
        keys are kept: a lookup opens no file, and a table holds them only if detection allowed them."""
        return [k for k in (normalize_key(key, allow_absolute=True) for key in self.keys) if isinstance(k, str)]

    def content_hash(self) -> str:
        if self.raw is not None:
            return hashlib.sha256(self.raw).hexdigest()
        return pixel_hash(self.image)


def pixel_hash(image: Image.Image) -> str:
    """sha256 of an image's decoded RGB pixels and size (for images without stored bytes)."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"rgb:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def read_box_table(box_dir: str | Path) -> tuple[dict[str, list[Detection]], dict[str, list[Detection]]]:
    """:func:`detector.tables.read_box_index`, cached per set of shard files (benchmarks share it)."""
    from detector.tables import read_box_index

    files = sorted((Path(box_dir) / "boxes").glob("*.parquet"))
    cache_key = tuple((str(f.resolve()), f.stat().st_mtime_ns) for f in files)
    with _INDEX_LOCK:
        if cache_key not in _INDEX_CACHE:
            _INDEX_CACHE[cache_key] = read_box_index(box_dir)
        return _INDEX_CACHE[cache_key]


def detector_fingerprint(settings) -> str:
    """Identity of what decides the boxes: weights (file hash or YAML name) and parameters."""
    from detector.model import file_sha256, params_json

    model = Path(settings.model)
    weights = file_sha256(model) if model.is_file() else str(settings.model)
    payload = json.dumps({"weights": weights, "params": params_json(settings.params())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class BoxSource:
    """Boxes for benchmark images: see the module docstring. Counts where each image's came from."""

    def __init__(self, boxes_dir: str | Path | None = None, detector_settings=None,
                 cache_dir: str | Path | None = None, allow_missing: bool = False):
        self.by_key: dict[str, list[Detection]] = {}
        self.by_sha: dict[str, list[Detection]] = {}
        if boxes_dir and (Path(boxes_dir) / "boxes").is_dir():
            self.by_key, self.by_sha = read_box_table(boxes_dir)
        elif boxes_dir:
            log.warning("box table %s not found: every image's boxes come from the detector", boxes_dir)
        self.settings = detector_settings
        self.cache_dir = None
        if detector_settings is not None:
            base = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "mgllava" / "detections"
            self.cache_dir = base / detector_fingerprint(detector_settings)
        self.allow_missing = allow_missing
        self.counts = {"table": 0, "cache": 0, "detector": 0, "none": 0}
        self._lock = threading.Lock()

    def _cache_file(self, digest: str) -> Path:
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _read_cache(self, digest: str) -> list[Detection] | None:
        try:
            return [tuple(d) for d in json.loads(self._cache_file(digest).read_text())]
        except FileNotFoundError:
            return None

    def _write_cache(self, digest: str, detections: list[Detection]) -> None:
        path = self._cache_file(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps([list(d) for d in detections]))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file

    def boxes(self, refs: list[ImageRef]) -> list[tuple[Boxes, str]]:
        """``(Boxes, origin)`` per image; origin is ``table``, ``cache``, ``detector`` or ``none``."""
        found: list[tuple[list[Detection], str] | None] = []
        digests = [ref.content_hash() for ref in refs]
        for ref, digest in zip(refs, digests):
            hit = self.by_sha.get(digest) if ref.raw is not None else None
            if hit is None:
                hit = next((self.by_key[k] for k in ref.lookup_keys() if k in self.by_key), None)
            if hit is not None:
                found.append((hit, "table"))
            elif self.cache_dir is not None and (cached := self._read_cache(digest)) is not None:
                found.append((cached, "cache"))
            else:
                found.append(None)
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            if self.settings is None:
                if not self.allow_missing:
                    raise LookupError(
                        f"{len(missing)} image(s) have no row in the box table and no detector is configured "
                        "(give boxes_dir= a table covering them, or detector= weights for on-the-fly detection)"
                    )
                for i in missing:
                    found[i] = ([], "none")
            else:
                from detector.model import get_detector

                first = {digests[i]: i for i in reversed(missing)}  # one detection per distinct image
                arrays = [np.asarray(refs[i].image.convert("RGB"))[:, :, ::-1].copy() for i in first.values()]
                detections = dict(zip(first, get_detector(self.settings).predict(arrays), strict=True))
                for digest, dets in detections.items():
                    self._write_cache(digest, dets)
                for i in missing:
                    found[i] = (detections[digests[i]], "detector")
        with self._lock:
            for _, origin in found:
                self.counts[origin] += 1
        return [(Boxes.from_detections(dets), origin) for dets, origin in found]
