"""The project's DuckDB warehouse: one file, tables declared in one place, views over Parquet.

- :func:`connect` opens ``$MGLLAVA_HOME/warehouse.duckdb`` (or a given file),
  retrying while another process holds DuckDB's single-writer lock, and (for a
  writable connection) makes sure every table of :data:`TABLES` exists.
- :data:`TABLES` is the one list of ``CREATE TABLE IF NOT EXISTS`` statements:
  other stages add theirs there (runs, training steps, scores, predictions...),
  and :func:`ensure_schema` runs them all, idempotently, in one transaction.
- :func:`create_box_views` (re)creates the views ``boxes``, ``box_rejects``,
  ``box_detections`` (one row per box) and ``box_images`` (one row per image,
  with its box count and labels) over a box-table directory's Parquet files.

User values always go through bound parameters, except where DuckDB cannot
bind them: a ``CREATE VIEW`` body is stored as SQL text and re-bound on each
use, so a prepared parameter has nothing to bind to there. The Parquet glob in
a view is therefore written as a SQL string literal by :func:`sql_string`
(single quotes doubled: the only escape a standard SQL string needs), never
by pasting raw text, and view names come from a fixed allow-list.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import duckdb

from mgllava.config import mgllava_home

log = logging.getLogger(__name__)

WAREHOUSE_FILE = "warehouse.duckdb"

# Every warehouse table, in creation order. Add new tables here (CREATE TABLE IF NOT EXISTS only;
# schema changes of an existing table need a migration step in ensure_schema).
TABLES: list[str] = [
    """CREATE TABLE IF NOT EXISTS schema_info (
        key VARCHAR PRIMARY KEY,
        value VARCHAR NOT NULL
    )""",
    # one row per finished detection run (a box table directory)
    """CREATE TABLE IF NOT EXISTS box_runs (
        fingerprint VARCHAR PRIMARY KEY,
        out_dir VARCHAR NOT NULL,
        detector VARCHAR NOT NULL,
        weights_sha256 VARCHAR NOT NULL,
        params JSON,
        schema_version VARCHAR NOT NULL,
        n_images BIGINT NOT NULL,
        n_rows BIGINT NOT NULL,
        n_rejects BIGINT NOT NULL,
        n_boxes BIGINT NOT NULL,
        created_at TIMESTAMPTZ,
        finished_at TIMESTAMPTZ,
        manifest JSON
    )""",
    # one row per training stage of a run (mgllava train); lineage to its config and box table
    """CREATE TABLE IF NOT EXISTS train_stages (
        run_id VARCHAR NOT NULL,
        stage VARCHAR NOT NULL,
        preset VARCHAR,
        config JSON,
        config_sha256 VARCHAR,
        corpus_sha256 VARCHAR,
        boxes_dir VARCHAR,
        box_fingerprint VARCHAR,
        status VARCHAR NOT NULL,
        started_at TIMESTAMPTZ,
        finished_at TIMESTAMPTZ,
        steps BIGINT,
        resumed_from BIGINT,
        final_loss DOUBLE,
        checkpoint_dir VARCHAR,
        trainable_weights VARCHAR,
        export_dir VARCHAR,
        records BIGINT,
        rejected_records JSON,
        skipped_samples JSON,
        images_without_boxes BIGINT,
        PRIMARY KEY (run_id, stage)
    )""",
    # one row per logged optimizer step: the loss curve is SELECT step, loss FROM train_steps WHERE ...
    """CREATE TABLE IF NOT EXISTS train_steps (
        run_id VARCHAR NOT NULL,
        stage VARCHAR NOT NULL,
        step BIGINT NOT NULL,
        loss DOUBLE,
        lr DOUBLE,
        grad_norm DOUBLE,
        samples_per_s DOUBLE,
        tokens_per_s DOUBLE,
        skipped BIGINT,
        logged_at TIMESTAMPTZ,
        PRIMARY KEY (run_id, stage, step)
    )""",
    # one row per evaluation run (mgllava evaluate / flow evaluate) of one checkpoint
    """CREATE TABLE IF NOT EXISTS eval_runs (
        run_id VARCHAR PRIMARY KEY,
        checkpoint VARCHAR NOT NULL,
        preset VARCHAR,
        config JSON,
        tasks JSON,
        eval_limit BIGINT,
        batch_size BIGINT,
        max_new_tokens BIGINT,
        boxes_dir VARCHAR,
        detector VARCHAR,
        status VARCHAR NOT NULL,
        started_at TIMESTAMPTZ,
        finished_at TIMESTAMPTZ,
        n_completed BIGINT,
        n_failed BIGINT,
        n_skipped BIGINT
    )""",
    # the latest outcome of each (checkpoint, task): completed, failed or skipped, with the reason
    """CREATE TABLE IF NOT EXISTS eval_tasks (
        checkpoint VARCHAR NOT NULL,
        task VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,
        lmms_task VARCHAR,
        status VARCHAR NOT NULL,
        reason VARCHAR,
        data_dir VARCHAR,
        n BIGINT,
        seconds DOUBLE,
        generate_seconds DOUBLE,
        samples_per_s DOUBLE,
        box_origins JSON,
        evaluated_at TIMESTAMPTZ,
        PRIMARY KEY (checkpoint, task)
    )""",
    # one row per metric of a completed (checkpoint, task); re-evaluation replaces them
    """CREATE TABLE IF NOT EXISTS scores (
        run_id VARCHAR NOT NULL,
        checkpoint VARCHAR NOT NULL,
        task VARCHAR NOT NULL,
        metric VARCHAR NOT NULL,
        value DOUBLE,
        n BIGINT,
        evaluated_at TIMESTAMPTZ,
        PRIMARY KEY (checkpoint, task, metric)
    )""",
    # one row per evaluated sample: what was asked, expected, answered, and how it scored
    """CREATE TABLE IF NOT EXISTS predictions (
        run_id VARCHAR NOT NULL,
        checkpoint VARCHAR NOT NULL,
        task VARCHAR NOT NULL,
        doc_id BIGINT NOT NULL,
        question VARCHAR,
        prompt VARCHAR,
        target VARCHAR,
        prediction VARCHAR,
        score DOUBLE,
        correct BOOLEAN,
        n_boxes BIGINT,
        box_origin VARCHAR,
        PRIMARY KEY (checkpoint, task, doc_id)
    )""",
]

WAREHOUSE_SCHEMA_VERSION = "1"

BOX_VIEWS = ("boxes", "box_rejects", "box_detections", "box_images")
_GLOB_CHARS = set("*?[]{}")


def default_path() -> Path:
    return mgllava_home() / WAREHOUSE_FILE


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text or "already open" in text


def open_with_retry(path: str | Path, read_only: bool = False, timeout: float = 30.0,
                    interval: float = 0.1) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect`` that waits (up to ``timeout`` s) while another process holds the file's lock."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_error(exc) or time.monotonic() >= deadline:
                if _is_lock_error(exc):
                    raise TimeoutError(
                        f"DuckDB warehouse {path} stayed locked by another process for {timeout:.0f} s: {exc}"
                    ) from exc
                raise
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)


def connect(path: str | Path | None = None, read_only: bool = False, timeout: float = 30.0) -> duckdb.DuckDBPyConnection:
    """Open the warehouse (default ``$MGLLAVA_HOME/warehouse.duckdb``); a writable one gets the schema."""
    path = Path(path).expanduser() if path else default_path()
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    con = open_with_retry(path, read_only=read_only, timeout=timeout)
    if not read_only:
        ensure_schema(con)
    return con


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table of :data:`TABLES` that is missing (idempotent)."""
    con.execute("BEGIN TRANSACTION")
    try:
        for statement in TABLES:
            con.execute(statement)
        con.execute(
            "INSERT INTO schema_info VALUES ('warehouse_schema_version', ?) ON CONFLICT (key) DO NOTHING",
            [WAREHOUSE_SCHEMA_VERSION],
        )
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def sql_string(value: str) -> str:
    """A SQL string literal for ``value`` (quotes doubled); for the places DuckDB cannot bind parameters."""
    if "\x00" in value:
        raise ValueError("NUL character in a SQL string")
    return "'" + value.replace("'", "''") + "'"


def _parquet_source(folder: Path) -> str:
    """The ``read_parquet`` argument for every ``*.parquet`` file of ``folder``.

    A glob (so the view sees shards added later) unless the folder's own path contains
    glob characters, which DuckDB would expand: then the current files, listed explicitly.
    """
    folder = folder.resolve()
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {folder}")
    if _GLOB_CHARS & set(str(folder)):
        return "[" + ", ".join(sql_string(str(f)) for f in files) + "]"
    return sql_string(str(folder / "*.parquet"))


def create_box_views(con: duckdb.DuckDBPyConnection, box_dir: str | Path) -> None:
    """(Re)create the box views over the box table in ``box_dir`` (its ``boxes/`` and ``rejects/``)."""
    box_dir = Path(box_dir).expanduser()
    boxes_src = _parquet_source(box_dir / "boxes")
    rejects_src = _parquet_source(box_dir / "rejects")
    opts = "union_by_name = true, hive_partitioning = false"
    con.execute(f"CREATE OR REPLACE VIEW boxes AS SELECT * FROM read_parquet({boxes_src}, {opts})")
    con.execute(f"CREATE OR REPLACE VIEW box_rejects AS SELECT * FROM read_parquet({rejects_src}, {opts})")
    con.execute(
        """CREATE OR REPLACE VIEW box_detections AS
        SELECT image_key, width, height, detector, box_index,
               b.x1 AS x1, b.y1 AS y1, b.x2 AS x2, b.y2 AS y2, b.score AS score, b.label AS label
        FROM (SELECT image_key, width, height, detector,
                     unnest(boxes) AS b, unnest(generate_series(1, len(boxes))) AS box_index
              FROM boxes)"""
    )
    con.execute(
        """CREATE OR REPLACE VIEW box_images AS
        SELECT image_key, width, height, sha256, detector, weights_sha256, detected_at,
               len(boxes) AS n_boxes,
               list_sort(list_distinct([b.label FOR b IN boxes])) AS labels
        FROM boxes"""
    )


def record_box_run(con: duckdb.DuckDBPyConnection, box_dir: str | Path) -> None:
    """Insert or update the ``box_runs`` row of the finished run in ``box_dir`` (from its manifest)."""
    box_dir = Path(box_dir).expanduser().resolve()
    manifest = json.loads((box_dir / "manifest.json").read_text())
    if manifest.get("status") != "complete":
        raise ValueError(f"the detection run in {box_dir} is not complete")
    totals, det = manifest["totals"], manifest["detector"]
    con.execute(
        """INSERT OR REPLACE INTO box_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        [
            manifest["fingerprint"], str(box_dir), det["name"], det["weights_sha256"],
            json.dumps(det["params"]), manifest["schema_version"], totals["images"], totals["rows"],
            totals["rejects"], totals["boxes"], manifest.get("created_at"), manifest.get("finished_at"),
            json.dumps(manifest),
        ],
    )


def register_box_table(box_dir: str | Path, path: str | Path | None = None) -> None:
    """Record a finished box table in ``box_runs`` and point the box views at it (one transaction each)."""
    with connect(path) as con:
        record_box_run(con, box_dir)
        create_box_views(con, box_dir)
