"""Reading the Parquet box tables back: :class:`BoxTable`, image key -> its detections.

The one reader of :mod:`detector.schema`'s tables, for everything that joins on the image
key (training, evaluation, the box-file import, the warehouse's box views). A box table is a
directory: ``manifest.json`` (the finished run: its shards and their sha256) and the shards
``boxes/part-*.parquet`` and ``rejects/part-*.parquet``. Opening one refuses an unfinished run;
reading refuses a shard of another schema version or other column types, a shard whose bytes
differ from the sha256 the manifest records for it (a corrupted or replaced file), a missing
shard and a shard the run does not list, each with one :class:`~detector.errors.BoxTableError`
line naming the file. A folder without a ``manifest.json`` (a table written by other means) is
read unchecked.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from detector.errors import BoxTableError
from detector.keys import normalize_key
from detector.schema import BOXES_FIELDS, META_SCHEMA_VERSION, SCHEMA_VERSION

Detection = tuple[float, float, float, float, float, str]  # x1, y1, x2, y2, score, label

MANIFEST_FILE = "manifest.json"
READ_COLUMNS = ("image_key", "sha256", "boxes")
_READ_TYPES = {f.name: f.type for f in BOXES_FIELDS if f.name in READ_COLUMNS}


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


class BoxTable:
    """A box table directory opened for reading (see the module docstring).

    ``BoxTable.open(dir)`` gives the process' shared instance with its rows read, checked and
    indexed (the benchmarks of one evaluation read a table once); ``BoxTable(dir)`` reads the
    manifest only, and its rows on the first lookup. Lookups: ``table.get(key)`` by image key (any
    spelling :func:`detector.keys.normalize_key` accepts: ``./img//a.png`` finds ``img/a.png``),
    ``table.get_by_sha256(digest)`` by the image bytes' sha256. :meth:`verify` checks every shard's
    checksum without parsing rows.
    """

    _cache: dict[Path, tuple[tuple, BoxTable]] = {}  # directory -> (its files' stats, the table)
    _cache_lock = threading.Lock()

    def __init__(self, box_dir: str | Path):
        self.dir = Path(box_dir)
        self.manifest = self._read_manifest()  # first: an unfinished run says so, shards written or not
        self.files = sorted((self.dir / "boxes").glob("*.parquet"))
        if not self.files:
            raise FileNotFoundError(f"no box table shards in {self.dir / 'boxes'}: run `mgllava detect` first")
        self._index: tuple[dict[str, list[Detection]], dict[str, list[Detection]]] | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, box_dir: str | Path) -> BoxTable:
        """The shared instance for ``box_dir``, rows loaded, while its manifest and shard files keep their
        size and modification time (a rewritten file opens the table afresh, checksums included)."""
        box_dir = Path(box_dir).resolve()
        files = [box_dir / MANIFEST_FILE, *sorted((box_dir / "boxes").glob("*.parquet"))]
        stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
        with cls._cache_lock:
            cached = cls._cache.get(box_dir)
            if cached is None or cached[0] != stats:
                table = cls(box_dir)
                table._rows()
                cached = cls._cache[box_dir] = (stats, table)
            return cached[1]

    def _read_manifest(self) -> dict | None:
        path = self.dir / MANIFEST_FILE
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
        return manifest

    @property
    def fingerprint(self) -> str | None:
        """The run's fingerprint (its inputs, detector and sharding); None without a manifest."""
        return self.manifest.get("fingerprint") if self.manifest else None

    def recorded_checksums(self) -> dict[str, str | None] | None:
        """``{"boxes/part-00000.parquet": sha256, "rejects/...": ...}`` from the manifest; None without one."""
        if self.manifest is None:
            return None
        sums: dict[str, str | None] = {}
        for shard in self.manifest.get("shards", []):
            sums[shard["boxes_file"]] = shard.get("boxes_sha256")
            sums[shard["rejects_file"]] = shard.get("rejects_sha256")
        return sums

    def _check(self, file: Path, sums: dict | None, data: bytes | None = None) -> None:
        """Refuse ``file`` unless the run lists it and its bytes hash to the recorded sha256."""
        if sums is None:
            return
        name = file.relative_to(self.dir).as_posix()
        if name not in sums:
            raise BoxTableError(f"{file}: not a shard of the run recorded in {self.dir / MANIFEST_FILE}")
        problem = checksum_problem(file, sums[name], data)
        if problem:
            raise BoxTableError(f"{problem}; run `mgllava detect` again to redo the shard")

    def _check_listed(self, sums: dict | None, prefix: str) -> None:
        missing = sorted(n for n in sums or () if n.startswith(prefix) and not (self.dir / n).is_file())
        if missing:
            raise BoxTableError(f"{self.dir / missing[0]}: missing (listed in {self.dir / MANIFEST_FILE})")

    def verify(self) -> None:
        """Check every shard, boxes and rejects, against the manifest's sha256 (BoxTableError naming the first
        file that fails); rows are not parsed."""
        sums = self.recorded_checksums()
        self._check_listed(sums, "")
        for file in [*self.files, *sorted((self.dir / "rejects").glob("*.parquet"))]:
            self._check(file, sums)

    def _load(self) -> tuple[dict[str, list[Detection]], dict[str, list[Detection]]]:
        """``(by image key, by sha256)``: each shard's bytes are checked against the manifest, then parsed."""
        sums = self.recorded_checksums()
        self._check_listed(sums, "boxes/")
        by_key: dict[str, list[Detection]] = {}
        by_sha: dict[str, list[Detection]] = {}
        for file in self.files:
            data = file.read_bytes()
            self._check(file, sums, data)
            try:
                table = pq.read_table(pa.BufferReader(data), columns=list(READ_COLUMNS))
            except (pa.ArrowException, KeyError) as exc:
                raise BoxTableError(f"{file}: not a box table shard ({type(exc).__name__}: {exc})") from None
            version = (table.schema.metadata or {}).get(META_SCHEMA_VERSION, b"").decode()
            if version != SCHEMA_VERSION:
                raise BoxTableError(f"{file}: box table schema version {version!r}, this reader knows "
                                    f"{SCHEMA_VERSION!r}")
            wrong = [f"{c} is {table.schema.field(c).type}" for c in READ_COLUMNS
                     if not table.schema.field(c).type.equals(_READ_TYPES[c])]
            if wrong:
                raise BoxTableError(f"{file}: not the box table schema {SCHEMA_VERSION} ({'; '.join(wrong)})")
            for key, sha, boxes in zip(*(table.column(c).to_pylist() for c in READ_COLUMNS)):
                detections = [(b["x1"], b["y1"], b["x2"], b["y2"], b["score"], b["label"]) for b in boxes]
                by_key[key] = detections
                by_sha[sha] = detections
        return by_key, by_sha

    def _rows(self) -> tuple[dict[str, list[Detection]], dict[str, list[Detection]]]:
        with self._lock:
            if self._index is None:
                self._index = self._load()
            return self._index

    def get(self, key: str) -> list[Detection] | None:
        """The detections of the image ``key`` (normalised; absolute keys kept: a lookup opens no file),
        or None when the table has no row for it."""
        key = normalize_key(key, allow_absolute=True)
        return self._rows()[0].get(key) if isinstance(key, str) else None

    def get_by_sha256(self, digest: str) -> list[Detection] | None:
        """The detections of the image whose stored bytes hash to ``digest``, or None."""
        return self._rows()[1].get(digest)

    def items(self):
        """``(image key, detections)`` of every row."""
        return self._rows()[0].items()

    def keys(self) -> list[str]:
        return sorted(self._rows()[0])

    def __len__(self) -> int:
        return len(self._rows()[0])

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None
