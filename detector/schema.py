"""Arrow schemas of the Parquet box tables (see ``detector/SCHEMA.md``).

Bump :data:`SCHEMA_VERSION` on any change a reader could notice (a column added,
removed, renamed or retyped, or a change of meaning), and describe it in
SCHEMA.md's changelog.
"""

from __future__ import annotations

import pyarrow as pa

from detector.keys import REFUSAL_REASONS

SCHEMA_VERSION = "1"

META_SCHEMA_VERSION = b"mgllava.schema_version"
META_TABLE = b"mgllava.table"
META_RUN = b"mgllava.run_fingerprint"
META_SHARD = b"mgllava.shard"

BOX_STRUCT = pa.struct(
    [
        pa.field("x1", pa.float32(), nullable=False),
        pa.field("y1", pa.float32(), nullable=False),
        pa.field("x2", pa.float32(), nullable=False),
        pa.field("y2", pa.float32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
    ]
)

_TIME = pa.timestamp("us", tz="UTC")

BOXES_FIELDS = [
    pa.field("image_key", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("boxes", pa.list_(pa.field("item", BOX_STRUCT, nullable=False)), nullable=False),
    pa.field("detector", pa.string(), nullable=False),
    pa.field("weights_sha256", pa.string(), nullable=False),
    pa.field("params", pa.string(), nullable=False),
    pa.field("detected_at", _TIME, nullable=False),
    pa.field("shard", pa.int32(), nullable=False),
]

REJECTS_FIELDS = [
    pa.field("image_key", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("detector", pa.string(), nullable=False),
    pa.field("weights_sha256", pa.string(), nullable=False),
    pa.field("detected_at", _TIME, nullable=False),
    pa.field("shard", pa.int32(), nullable=False),
]

# why an image was rejected (the ``reason`` column); training counts its skipped samples under the same names
REJECT_REASONS = {
    **REFUSAL_REASONS,
    "missing": "no file at the image's path",
    "empty": "the file has 0 bytes",
    "not_a_file": "the path is a directory or another non-regular file",
    "unreadable": "the file cannot be opened or identified as an image",
    "truncated": "the header is readable but the pixel data is cut short or corrupt",
    "zero_size": "the image has a zero width or height",
    "too_large": "width x height exceeds detector.max_image_pixels "
    "(or Pillow's decompression-bomb limit)",
    "detector_error": "the detector raised an error on this image alone",
}


def _with_meta(fields: list[pa.Field], table: str, run: str = "", shard: int | None = None) -> pa.Schema:
    meta = {META_SCHEMA_VERSION: SCHEMA_VERSION.encode(), META_TABLE: table.encode()}
    if run:
        meta[META_RUN] = run.encode()
    if shard is not None:
        meta[META_SHARD] = str(shard).encode()
    return pa.schema(fields, metadata=meta)


def boxes_schema(run: str = "", shard: int | None = None) -> pa.Schema:
    return _with_meta(BOXES_FIELDS, "boxes", run, shard)


def rejects_schema(run: str = "", shard: int | None = None) -> pa.Schema:
    return _with_meta(REJECTS_FIELDS, "box_rejects", run, shard)
