"""``mgllava detect import``: a published MG-LLaVA box file into a box table (detector/SCHEMA.md).

The reference ships its detections (RAM++ tags prompting OWLv2, ``bbox_generation/
image_offline_to_bbox.py``) as a JSON list of ``{"id", "boxes": [[x1, y1, x2, y2], ...] (ints),
"scores": [...], "labels": [tag, ...]}``, one entry per sample ``id`` of a LLaVA JSON. Its boxes are
in original-image pixels: OWLv2 pads the image at the bottom and right to a square and the script
scales its outputs to ``max(width, height)`` on both axes, so the origin is the image's top-left corner
and a box may reach into that padding; the reference's dataset then adds its own centring offset
(``adjust_padding_boxes``), exactly as our processor does with a box table's rows.

:func:`import_boxes` joins each entry's ``id`` to the corpus records (ids compared as text, so
``7`` and ``"7"`` are one id, as the reference's ``str(item['id'])``) and so to an image key
(:func:`detector.inputs.image_ref`: the normaliser and refusals of detection). Each image file is read
with detection's loader (:func:`detector.images.decode_image`): ``width``/``height`` come from its
header and ``sha256`` from its bytes; an unusable file becomes a reject row with detection's reason.
Boxes are clipped to the image (the schema's frame); a box left empty is dropped; rows list boxes by
decreasing score. The ``detector`` column says ``import:<box file name>`` and ``weights_sha256`` is
the box file's sha256.

Every entry, record and image is accounted for (``manifest.json``'s ``import`` section), and the
totals reconcile:

- entries = matched + unknown_id + text_only_id + ambiguous_id + duplicate_id + malformed;
  ``duplicate_id``: an earlier entry of an id that appears again (the last one is used, as in the
  reference); ``ambiguous_id``: the id's records name different images; ``malformed``: not an object
  with a text or integer id and equally long lists of four finite coordinates, finite scores and
  text labels;
- records = text_only_records + records_with_entry + records_without_entry;
- matched = images + shared_image_entries (entries of further ids of an image already given boxes:
  the entry of the image's first record in corpus order is kept; ``conflicting_entries`` counts those
  whose boxes differ);
- images = rows + rejects.

The table is written with detection's own writers under its run lock: plan, shards with their
records, and :func:`detector.pipeline.finalize_run`'s verified, checksummed manifest, so
:class:`detector.tables.BoxTable`, training and the warehouse read it like a detected table.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from detector import schema
from detector.errors import BoxTableError, RunConflictError
from detector.images import Rejected, decode_image
from detector.inputs import ImageEntry, Inputs, image_ref, read_llava
from detector.model import params_json
from detector.pipeline import (
    BOXES_DIR,
    PLAN_FILE,
    REJECTS_DIR,
    SHARDS_DIR,
    atomic_write_table,
    finalize_run,
    input_fingerprint,
    read_manifest,
    run_fingerprint,
    run_lock,
    write_manifest,
    write_shard,
)
from detector.tables import MANIFEST_FILE, BoxTable, Detection, sha256_file

log = logging.getLogger(__name__)

EXAMPLES = 20  # ids/entries listed per kind of problem in the manifest and the summary


class BoxImportError(ValueError):
    """The box file or corpus cannot be imported at all (unreadable, not a list, nothing matches)."""


@dataclass
class ImportCounts:
    entries: int = 0
    matched: int = 0
    unknown_id: int = 0
    text_only_id: int = 0
    ambiguous_id: int = 0
    duplicate_id: int = 0
    malformed: int = 0
    records: int = 0
    text_only_records: int = 0
    records_with_entry: int = 0
    records_without_entry: int = 0
    images: int = 0
    shared_image_entries: int = 0
    conflicting_entries: int = 0
    boxes_clipped: int = 0
    boxes_dropped_empty: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, example: str) -> None:
        """Count one ``kind`` and keep the first few examples of it."""
        setattr(self, kind, getattr(self, kind) + 1)
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append(example)

    def check(self) -> None:
        """Raise if the entry, record or image totals do not reconcile."""
        parts = {
            "entries": ("matched", "unknown_id", "text_only_id", "ambiguous_id", "duplicate_id", "malformed"),
            "records": ("text_only_records", "records_with_entry", "records_without_entry"),
            "matched": ("images", "shared_image_entries"),
        }
        for total, names in parts.items():
            if getattr(self, total) != sum(getattr(self, n) for n in names):
                raise RuntimeError(f"import totals do not reconcile: {total} != {' + '.join(names)} ({asdict(self)})")


@dataclass
class ImportResult:
    out: Path
    manifest: dict
    skipped: bool

    def summary(self) -> str:
        c, t = self.manifest["import"]["counts"], self.manifest["totals"]
        lines = [
            f"detect import: {c['entries']} entries: {c['matched']} matched, {c['unknown_id']} unknown ids, "
            f"{c['text_only_id']} ids of text-only records, {c['ambiguous_id']} ambiguous ids, "
            f"{c['duplicate_id']} duplicate ids, {c['malformed']} malformed",
            f"  {c['records']} records: {c['records_with_entry']} with a box entry, {c['records_without_entry']} "
            f"without, {c['text_only_records']} text-only",
            f"  {t['images']} images: {t['rows']} rows ({t['boxes']} boxes; {c['boxes_clipped']} clipped to the "
            f"image, {c['boxes_dropped_empty']} empty dropped), {t['rejects']} rejects "
            f"{t['reject_reasons'] or ''}; {c['shared_image_entries']} entries shared an image "
            f"({c['conflicting_entries']} with other boxes){'; already imported, skipped' if self.skipped else ''}"
            f" -> {self.out}",
        ]
        for kind, shown in self.manifest["import"]["counts"]["examples"].items():
            lines.append(f"  {kind}: {'; '.join(shown[:5])}{' ...' if c[kind] > 5 else ''}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- parsing


def _id_text(value) -> str | None:
    """An id as the reference compares it (``str(id)``); None for anything but text or an integer."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    return text if text.strip() else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_entry(entry) -> tuple[str, list[Detection]] | str:
    """``(id, [(x1, y1, x2, y2, score, label), ...])`` of one box-file entry, or why it is malformed."""
    if not isinstance(entry, dict):
        return f"not an object: {json.dumps(entry, default=str)[:60]}"
    sample_id = _id_text(entry.get("id"))
    if sample_id is None:
        return f"'id' must be text or an integer, got {json.dumps(entry.get('id'), default=str)[:40]}"
    boxes, scores, labels = entry.get("boxes"), entry.get("scores"), entry.get("labels")
    if not all(isinstance(v, list) for v in (boxes, scores, labels)):
        return f"id {sample_id}: 'boxes', 'scores' and 'labels' must be lists"
    if not len(boxes) == len(scores) == len(labels):
        return f"id {sample_id}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels"
    detections = []
    for i, (box, score, label) in enumerate(zip(boxes, scores, labels)):
        if not (isinstance(box, list) and len(box) == 4 and all(_finite(v) for v in box)):
            return f"id {sample_id}: box {i} is not four finite numbers: {json.dumps(box, default=str)[:60]}"
        if not _finite(score) or not isinstance(label, str):
            return f"id {sample_id}: box {i} has score {score!r} and label {label!r} (a number and a text needed)"
        detections.append((*(float(v) for v in box), float(score), label))
    return sample_id, detections


def _clip(detections: list[Detection], width: int, height: int, counts: ImportCounts) -> list[Detection]:
    """Boxes clipped to the ``width x height`` image, empty ones dropped, by decreasing score."""
    kept = []
    for x1, y1, x2, y2, score, label in detections:
        clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                   min(max(x2, 0.0), width), min(max(y2, 0.0), height))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            counts.boxes_dropped_empty += 1
            continue
        counts.boxes_clipped += clipped != (x1, y1, x2, y2)
        kept.append((*clipped, score, label))
    return sorted(kept, key=lambda d: -d[4])


def _read_json(path: Path, what: str):
    try:
        return read_llava(path) if what == "corpus" else json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BoxImportError(f"{path}: unreadable {what} ({type(exc).__name__}: {exc})") from None


def join_entries(
    entries: list, records: list, image_root: Path, allow_absolute: bool, counts: ImportCounts
) -> dict[str, tuple[ImageEntry, list[Detection]]]:
    """Image key -> (its reference, the detections of its entry), counting every entry and record."""
    by_id: dict[str, list[Detection]] = {}
    for index, entry in enumerate(entries):
        parsed = parse_entry(entry)
        if isinstance(parsed, str):
            counts.note("malformed", f"entry {index}: {parsed}")
            continue
        sample_id, detections = parsed
        if sample_id in by_id:
            counts.note("duplicate_id", f"entry {index}: id {sample_id} again (the last entry is used)")
        by_id[sample_id] = detections

    images_of: dict[str, dict[str, ImageEntry]] = {}  # id -> image key -> ref, from the records
    record_ids: list[str | None] = []  # per image record: its id (None: no usable id)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            counts.note("records_without_entry", f"record {index}: not an object")
            continue
        sample_id = _id_text(record.get("id"))
        refs = images_of.setdefault(sample_id, {}) if sample_id is not None else {}
        if record.get("image") is None:
            counts.text_only_records += 1
            continue
        record_ids.append(sample_id)
        if sample_id is None:
            counts.note("records_without_entry", f"record {index}: no text or integer 'id'")
            continue
        ref = image_ref(image_root, record["image"], allow_absolute)
        refs[ref.key] = ref

    usable_ids = set()
    for sample_id in by_id:
        refs = images_of.get(sample_id)
        if refs is None:
            counts.note("unknown_id", sample_id)
        elif not refs:
            counts.note("text_only_id", sample_id)
        elif len(refs) > 1:
            counts.note("ambiguous_id", f"{sample_id}: its records name {', '.join(sorted(refs)[:3])}")
        else:
            usable_ids.add(sample_id)
    counts.matched = len(usable_ids)
    table: dict[str, tuple[ImageEntry, list[Detection]]] = {}
    for sample_id in (i for i in images_of if i in usable_ids):  # corpus order: an image's first record wins
        (ref,) = images_of[sample_id].values()
        if ref.key not in table:
            table[ref.key] = (ref, by_id[sample_id])
            continue
        counts.shared_image_entries += 1
        if table[ref.key][1] != by_id[sample_id]:
            counts.note("conflicting_entries", f"{sample_id}: other boxes for {ref.key} (its first record's kept)")
    counts.images = len(table)
    counts.entries = len(entries)
    counts.records = len(records)
    for sample_id in record_ids:
        if sample_id in usable_ids:
            counts.records_with_entry += 1
        elif sample_id is not None:
            counts.note("records_without_entry", f"id {sample_id}")
    return table


# ----------------------------------------------------------------------------- writing


def _rows(table: dict, keys: list[str], index: int, identity: dict, counts: ImportCounts, max_pixels: int):
    """The boxes and rejects tables of shard ``index`` (``keys``), images read with detection's loader."""
    rows = {f.name: [] for f in schema.BOXES_FIELDS}
    rejects = {f.name: [] for f in schema.REJECTS_FIELDS}
    when = dt.datetime.now(dt.timezone.utc)
    name, weights, params = identity["name"], identity["weights_sha256"], params_json(identity["params"])
    for key in keys:
        ref, detections = table[key]
        decoded = decode_image(key, ref.path, max_pixels)
        if isinstance(decoded, Rejected):
            for col, val in (("image_key", key), ("reason", decoded.reason), ("detail", decoded.detail[:2000]),
                             ("path", decoded.path), ("detector", name), ("weights_sha256", weights),
                             ("detected_at", when), ("shard", index)):
                rejects[col].append(val)
            continue
        width, height = decoded.image.size
        boxes = _clip(detections, width, height, counts)
        for col, val in (("image_key", key), ("width", width), ("height", height),
                         ("sha256", hashlib.sha256(decoded.data).hexdigest()),
                         ("boxes", [dict(zip(("x1", "y1", "x2", "y2", "score", "label"), b)) for b in boxes]),
                         ("detector", name), ("weights_sha256", weights), ("params", params),
                         ("detected_at", when), ("shard", index)):
            rows[col].append(val)
    return rows, rejects


def import_boxes(
    boxes_file: str | Path,
    corpus: str | Path,
    image_root: str | Path,
    out: str | Path,
    *,
    max_image_pixels: int = 50_000_000,
    allow_absolute: bool = False,
    shard_size: int = 10_000,
    overwrite: bool = False,
) -> ImportResult:
    """Import the reference box file ``boxes_file`` for the LLaVA JSON ``corpus`` (images under
    ``image_root``) as a box table in ``out`` (see the module docstring). A finished import of the same
    files is skipped while its shards match their recorded sha256 (redone otherwise); ``out`` holding another
    table is refused unless ``overwrite``."""
    boxes_file, corpus = Path(boxes_file).expanduser().resolve(), Path(corpus).expanduser().resolve()
    image_root = Path(image_root).expanduser().resolve()
    entries = _read_json(boxes_file, "box file")
    if not isinstance(entries, list):
        raise BoxImportError(f"{boxes_file}: a box file holds a JSON list of entries, not a {type(entries).__name__}")
    records = _read_json(corpus, "corpus")
    counts = ImportCounts()
    table = join_entries(entries, records, image_root, allow_absolute, counts)
    counts.check()
    if not table:
        raise BoxImportError(
            f"{boxes_file}: none of its {counts.entries} entries matches an image record of {corpus} "
            f"(unknown ids: {', '.join(counts.examples.get('unknown_id', [])[:5]) or 'none'}); is it the right corpus?"
        )
    keys = sorted(table)
    identity = {
        "name": f"import:{boxes_file.name}",
        "weights_sha256": sha256_file(boxes_file),
        "params": {"corpus": corpus.name, "corpus_sha256": sha256_file(corpus), "frame": "original pixels, clipped",
                   "max_image_pixels": max_image_pixels},
    }
    refs = [table[k][0] for k in keys]
    inputs = Inputs(images=refs, sources=[], references=counts.matched, conflicts=0)
    fingerprint = run_fingerprint(input_fingerprint(inputs), identity, shard_size)
    out = Path(out).expanduser().resolve()
    with run_lock(out) as run_id:
        old = read_manifest(out)
        if old is not None and old.get("fingerprint") == fingerprint and old.get("status") == "complete":
            try:
                BoxTable(out).verify()
                return ImportResult(out, old, skipped=True)
            except (BoxTableError, FileNotFoundError) as exc:
                log.warning("the finished import in %s is redone: %s", out, exc)
        if old is not None and old.get("fingerprint") != fingerprint:
            if not overwrite:
                raise RunConflictError(f"{out} already holds another box table (fingerprint "
                                       f"{str(old.get('fingerprint'))[:12]}); give another --out or --overwrite")
            log.warning("overwriting the box table in %s", out)
        for sub in (BOXES_DIR, REJECTS_DIR, SHARDS_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
            (out / sub).mkdir()
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        return _write(out, run_id, fingerprint, identity, table, keys, refs, counts, shard_size, max_image_pixels,
                      {"boxes_file": str(boxes_file), "corpus": str(corpus), "image_root": str(image_root)})


def _write(out, run_id, fingerprint, identity, table, keys, refs, counts, shard_size, max_pixels, files) -> ImportResult:
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    n_shards = math.ceil(len(keys) / shard_size)
    atomic_write_table(pa.table({
        "image_key": pa.array(keys, pa.string()),
        "path": pa.array([r.path for r in refs], pa.string()),
        "shard": pa.array([i // shard_size for i in range(len(keys))], pa.int32()),
    }), out / PLAN_FILE)
    manifest = {
        "schema_version": schema.SCHEMA_VERSION, "fingerprint": fingerprint, "run_id": run_id, "status": "running",
        "created_at": started, "finished_at": None,
        "inputs": {"sources": [{"kind": "box_import", **files}], "references": counts.matched,
                   "distinct_images": len(keys), "duplicates": counts.shared_image_entries, "key_conflicts": 0},
        "detector": identity, "settings": None, "shard_size": shard_size, "n_shards": n_shards, "shards": [],
        "totals": None, "runs": [], "import": None,
    }
    write_manifest(out, manifest)
    for index in range(n_shards):
        shard_keys = keys[index * shard_size:(index + 1) * shard_size]
        rows, rejects = _rows(table, shard_keys, index, identity, counts, max_pixels)
        write_shard(out, index, fingerprint, rows, rejects)
    manifest["import"] = {"counts": asdict(counts)}
    write_manifest(out, manifest)
    manifest = finalize_run(out, computed=list(range(n_shards)), started_at=started, run_id=run_id)
    return ImportResult(out, manifest, skipped=False)
