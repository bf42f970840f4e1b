"""Reading the Parquet box tables back: image key -> its detections.

The reader side of :mod:`detector.schema`, for the stages that join on the image
key (training, evaluation). It refuses tables of another schema version, an
unfinished run, and shard files whose bytes differ from the sha256 the run's
``manifest.json`` records for them (a corrupted or replaced file). A folder
without a ``manifest.json`` (a table written by other means) is read unchecked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from detector.errors import BoxTableError
from detector.schema import META_SCHEMA_VERSION, SCHEMA_VERSION

Detection = tuple[float, float, float, float, float, str]  # x1, y1, x2, y2, score, label

MANIFEST_FILE = "manifest.json"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file's bytes (read now, never cached: this is what catches corruption)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_problem(path: Path, expected: str | None, data: bytes | None = None) -> str | None:
    """Why ``path`` (or ``data``, its bytes already read) does not hash to ``expected`` (None when it does)."""
    if not expected:
        return f"{path}: no sha256 recorded for it (written before checksums, or not by this run)"
    if data is None and not path.is_file():
        return f"{path}: missing"
    actual = sha256_file(path) if data is None else hashlib.sha256(data).hexdigest()
    if actual != expected:
        return f"{path}: content sha256 {actual[:12]}... differs from the recorded {expected[:12]}... (corrupted or replaced)"
    return None


def recorded_checksums(box_dir: str | Path) -> dict[str, str | None] | None:
    """``{"boxes/part-00000.parquet": sha256, ...}`` from the finished run's manifest; None without a manifest."""
    path = Path(box_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BoxTableError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("status") != "complete":
        raise BoxTableError(
            f"{path}: the box table is not finished (status {manifest.get('status')!r}); run `mgllava detect` "
            "again to complete it"
        )
    sums: dict[str, str | None] = {}
    for shard in manifest.get("shards", []):
        sums[shard["boxes_file"]] = shard.get("boxes_sha256")
        sums[shard["rejects_file"]] = shard.get("rejects_sha256")
    return sums


def read_box_index(box_dir: str | Path) -> tuple[dict[str, list[Detection]], dict[str, list[Detection]]]:
    """``(by image_key, by sha256)``: each image's ``[(x1, y1, x2, y2, score, label), ...]`` from
    ``box_dir/boxes/*.parquet``; each file's bytes are checked against their recorded sha256, then parsed."""
    box_dir = Path(box_dir)
    files = sorted((box_dir / "boxes").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no box table shards in {box_dir / 'boxes'}: run `mgllava detect` first")
    sums = recorded_checksums(box_dir)
    if sums is not None:
        missing = sorted(n for n in sums if n.startswith("boxes/") and not (box_dir / n).is_file())
        if missing:
            raise BoxTableError(f"{box_dir / missing[0]}: missing (listed in {box_dir / MANIFEST_FILE})")
    by_key: dict[str, list[Detection]] = {}
    by_sha: dict[str, list[Detection]] = {}
    for file in files:
        data = file.read_bytes()
        if sums is not None:
            name = f"boxes/{file.name}"
            if name not in sums:
                raise BoxTableError(f"{file}: not a shard of the run recorded in {box_dir / MANIFEST_FILE}")
            problem = checksum_problem(file, sums[name], data)
            if problem:
                raise BoxTableError(f"{problem}; run `mgllava detect` again to redo the shard")
        table = pq.read_table(pa.BufferReader(data), columns=["image_key", "sha256", "boxes"])
        version = (table.schema.metadata or {}).get(META_SCHEMA_VERSION, b"").decode()
        if version != SCHEMA_VERSION:
            raise ValueError(f"{file}: box table schema version {version!r}, this reader knows {SCHEMA_VERSION!r}")
        for key, sha, boxes in zip(*(table.column(c).to_pylist() for c in ("image_key", "sha256", "boxes"))):
            detections = [(b["x1"], b["y1"], b["x2"], b["y2"], b["score"], b["label"]) for b in boxes]
            by_key[key] = detections
            by_sha[sha] = detections
    return by_key, by_sha
