"""Reading the Parquet box tables back: image key -> its detections.

The reader side of :mod:`detector.schema`, for the stages that join on the image
key (training, evaluation). It refuses tables of another schema version.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from detector.schema import META_SCHEMA_VERSION, SCHEMA_VERSION

Detection = tuple[float, float, float, float, float, str]  # x1, y1, x2, y2, score, label


def read_box_index(box_dir: str | Path) -> tuple[dict[str, list[Detection]], dict[str, list[Detection]]]:
    """``(by image_key, by sha256)``: each image's ``[(x1, y1, x2, y2, score, label), ...]`` from
    ``box_dir/boxes/*.parquet``."""
    folder = Path(box_dir) / "boxes"
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no box table shards in {folder}: run `mgllava detect` first")
    by_key: dict[str, list[Detection]] = {}
    by_sha: dict[str, list[Detection]] = {}
    for file in files:
        version = (pq.read_schema(file).metadata or {}).get(META_SCHEMA_VERSION, b"").decode()
        if version != SCHEMA_VERSION:
            raise ValueError(f"{file}: box table schema version {version!r}, this reader knows {SCHEMA_VERSION!r}")
        table = pq.read_table(file, columns=["image_key", "sha256", "boxes"])
        for key, sha, boxes in zip(*(table.column(c).to_pylist() for c in ("image_key", "sha256", "boxes"))):
            detections = [(b["x1"], b["y1"], b["x2"], b["y2"], b["score"], b["label"]) for b in boxes]
            by_key[key] = detections
            by_sha[sha] = detections
    return by_key, by_sha
