"""Where a benchmark image's boxes come from: the box tables, else the detector (cached).

For each image, in order:

1. the Parquet box table (``detector/SCHEMA.md``) of ``boxes_dir``, joined on the image's
   content hash (``sha256`` of the stored PNG/JPEG bytes: the column the detection stage
   writes) or on an image key (the shapes world's sets hold keys such as
   ``bench/000003.png`` in their image-id columns), normalised as detection normalises keys
   (:meth:`detector.tables.BoxTable.get`: ``./bench//000003.png`` finds the same row);
2. the on-the-fly detector cache: one small JSON file per image under
   ``<cache_dir>/<detector fingerprint>/``, keyed by the content hash (the bytes' sha256,
   or for an image that has no stored bytes the sha256 of its decoded pixels);
3. the detector itself (:func:`detector.model.get_detector`), on every image of a batch
   that missed both, whose boxes then go into the cache.

The fingerprint covers the detector's weights (file hash, or the model YAML's name: a YAML
builds seeded random weights) and the parameters that decide boxes, so changing either
never reuses stale boxes. With no detector configured, an image without a box row is an
error (``allow_missing=True`` gives it no boxes instead).

An export knows its detector (SPEC section 5: object tokens at evaluation come from the
detector used for training): :func:`record_detector` copies the detector that made the
training box table (its ``manifest.json``: weights, their sha256, parameters) into the
export's ``detector/`` folder, and :func:`recorded_detector` gives it back at evaluation,
refusing a weights file whose sha256 no longer matches the record before anything loads it
(the copy still loads through ``detector.model``'s safe loading).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from detector.errors import DetectorError
from detector.tables import MANIFEST_FILE, BoxTable, Detection
from mgllava.model.boxes import Boxes

log = logging.getLogger(__name__)


EXPORT_DETECTOR_DIR = "detector"  # in an export directory
DETECTOR_RECORD = "detector.json"


class BoxesUnavailable(SystemExit):
    """The model cannot get boxes for its images (no table row and no usable detector).

    A ``SystemExit``, so that the stock ``lmms-eval`` command, which logs any ``Exception`` of a
    task and still exits 0, stops with this message and exit status 1."""


@dataclass
class ImageRef:
    """One image to find boxes for: the decoded image, its stored bytes if known, candidate keys."""

    image: Image.Image
    raw: bytes | None = None
    keys: tuple[str, ...] = ()
    _hash: str | None = field(default=None, init=False, repr=False, compare=False)

    def content_hash(self) -> str:
        """sha256 of the stored bytes, else of the decoded pixels (:func:`pixel_hash`); computed once (the
        box lookup and evaluation's feature cache both key on it)."""
        if self._hash is None:
            self._hash = hashlib.sha256(self.raw).hexdigest() if self.raw is not None else pixel_hash(self.image)
        return self._hash


def pixel_hash(image: Image.Image) -> str:
    """sha256 of an image's decoded RGB pixels and size (for images without stored bytes)."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"rgb:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def detector_fingerprint(settings) -> str:
    """Identity of what decides the boxes: weights (file hash or YAML name) and parameters."""
    from detector.model import file_sha256, params_json

    model = Path(settings.model)
    weights = file_sha256(model) if model.is_file() else str(settings.model)
    payload = json.dumps({"weights": weights, "params": params_json(settings.params())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _is_yaml(model: str) -> bool:
    return model.lower().endswith((".yaml", ".yml"))


def record_detector(box_table: str | Path, out: str | Path) -> dict | None:
    """Copy the detector that made ``box_table`` into the folder ``out`` with a ``detector.json``
    record (weights file name, its sha256, the detection parameters); the record, or None when the
    table names no detector that can be recorded (logged: evaluation then needs ``boxes_dir=`` or
    ``detector=``)."""
    from detector.model import file_sha256

    try:
        manifest = json.loads((Path(box_table) / MANIFEST_FILE).read_text())
        settings, identity = dict(manifest["settings"] or {}), manifest["detector"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("export: no detector recorded: box table %s has no readable manifest (%s)", box_table, exc)
        return None
    if not settings:
        log.warning("export: no detector recorded: box table %s was not detected (%s)", box_table, identity.get("name"))
        return None
    model = Path(str(settings.pop("model")))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    copied = model.is_file()
    if copied:
        shutil.copyfile(model, out / model.name)
        if not _is_yaml(model.name) and file_sha256(out / model.name) != identity["weights_sha256"]:
            shutil.rmtree(out)
            log.error("export: no detector recorded: %s changed since it made box table %s (sha256 differs "
                      "from the table's %s)", model, box_table, identity["weights_sha256"])
            return None
    embeddings = settings.pop("class_embeddings", None)
    if embeddings:
        shutil.copyfile(embeddings, out / Path(embeddings).name)
    for run_only in ("device", "batch", "allow_absolute_image_paths"):
        settings.pop(run_only, None)
    record = {
        "model": model.name if copied else str(model),  # an Ultralytics model YAML name builds seeded weights
        "copied": copied,
        "weights_sha256": identity["weights_sha256"],
        "class_embeddings": Path(embeddings).name if embeddings else None,
        "settings": settings,
        "box_table": str(Path(box_table).resolve()),
        "box_table_fingerprint": manifest.get("fingerprint"),
    }
    (out / DETECTOR_RECORD).write_text(json.dumps(record, indent=2))
    return record


def recorded_detector(export_dir: str | Path, device: str = "auto"):
    """``(DetectorSettings, weights sha256)`` of the detector an export recorded, or None if it has
    none. A copied weights file whose sha256 differs from the record is refused (DetectorError)
    before anything reads it as a model."""
    from detector.model import DetectorSettings, file_sha256

    folder = Path(export_dir) / EXPORT_DETECTOR_DIR
    if not (folder / DETECTOR_RECORD).is_file():
        return None
    record = json.loads((folder / DETECTOR_RECORD).read_text())
    model = str(folder / record["model"]) if record["copied"] else record["model"]
    if record["copied"] and not _is_yaml(model):
        found = file_sha256(model) if Path(model).is_file() else "missing"
        if found != record["weights_sha256"]:
            raise DetectorError(
                f"{model}: the export's recorded detector does not match its record (sha256 {found[:16]}, "
                f"recorded {record['weights_sha256'][:16]}): refusing to load it; give detector= weights "
                "or boxes_dir= a box table instead"
            )
    settings = dict(record["settings"], classes=tuple(record["settings"]["classes"] or ()) or None)
    embeddings = str(folder / record["class_embeddings"]) if record.get("class_embeddings") else None
    return DetectorSettings(model=model, class_embeddings=embeddings, device=device, **settings), record[
        "weights_sha256"]


class BoxSource:
    """Boxes for benchmark images: see the module docstring. Counts where each image's came from.
    With ``weights_sha256``, the detector is refused unless its weights hash to it (a recorded one)."""

    def __init__(self, boxes_dir: str | Path | None = None, detector_settings=None,
                 cache_dir: str | Path | None = None, allow_missing: bool = False,
                 weights_sha256: str | None = None):
        self.table: BoxTable | None = None  # one instance per table and process: benchmarks share it
        if boxes_dir and (Path(boxes_dir) / "boxes").is_dir():
            self.table = BoxTable.open(boxes_dir)
        elif boxes_dir:
            log.warning("box table %s not found: every image's boxes come from the detector", boxes_dir)
        self.settings = detector_settings
        self.weights_sha256 = weights_sha256
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
            hit = None
            if self.table is not None:
                hit = self.table.get_by_sha256(digest) if ref.raw is not None else None
                if hit is None:  # the candidate keys, in order (a key the normaliser refuses finds nothing)
                    hit = next((d for d in map(self.table.get, ref.keys) if d is not None), None)
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

                detector = get_detector(self.settings)
                if self.weights_sha256 and detector.weights_sha256 != self.weights_sha256:
                    raise DetectorError(f"detector {self.settings.model}: its weights do not match the recorded "
                                        f"sha256 {self.weights_sha256[:16]}")
                first = {digests[i]: i for i in reversed(missing)}  # one detection per distinct image
                arrays = [np.asarray(refs[i].image.convert("RGB"))[:, :, ::-1].copy() for i in first.values()]
                detections = dict(zip(first, detector.predict(arrays), strict=True))
                for digest, dets in detections.items():
                    self._write_cache(digest, dets)
                for i in missing:
                    found[i] = (detections[digests[i]], "detector")
        with self._lock:
            for _, origin in found:
                self.counts[origin] += 1
        return [(Boxes.from_detections(dets), origin) for dets, origin in found]
