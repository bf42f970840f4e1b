"""The project's DuckDB warehouse: one file, tables declared in one place, views over Parquet.

- :func:`connect` opens ``$MGLLAVA_HOME/warehouse.duckdb`` (or a given file),
  retrying while another process holds DuckDB's single-writer lock, and (for a
  writable connection) makes sure every table of :data:`TABLES` exists.
- :data:`TABLES` is the one list of ``CREATE TABLE IF NOT EXISTS`` statements:
  other stages add theirs there (runs, training steps, scores, predictions...);
  :data:`MIGRATIONS` adds the columns that came later (``ADD COLUMN IF NOT
  EXISTS``), so an existing warehouse and a new one end with the same tables;
  :func:`ensure_schema` runs them all, idempotently, in one transaction (every
  writable :func:`connect`; readers call :func:`upgrade` first).
- A reader or writer that cannot get the file within its wait gets
  :class:`WarehouseBusy`: one line naming the file and the process holding it.
- :func:`insert_arrow` bulk-inserts a ``pyarrow`` table (one statement, not one per row);
  :func:`transaction` wraps work in BEGIN / COMMIT, rolling back on any exception.
- :func:`sandboxed_query` runs one user-supplied read-only statement with DuckDB's
  external access off (except the box-table directories the views read), extensions
  neither installed nor loaded, and the configuration locked.
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
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

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
    # one row per trained variant of an ablation (mgllava ablate): its export joins predictions on checkpoint
    """CREATE TABLE IF NOT EXISTS ablation_variants (
        ablation_id VARCHAR NOT NULL,
        variant VARCHAR NOT NULL,
        granularities JSON,
        seed BIGINT NOT NULL,
        baseline VARCHAR NOT NULL,
        checkpoint VARCHAR NOT NULL,
        preset VARCHAR,
        config JSON,
        recorded_at TIMESTAMPTZ,
        PRIMARY KEY (ablation_id, variant, seed)
    )""",
]

# Columns added after a table was first declared, for existing warehouses and new ones alike.
MIGRATIONS: list[str] = [
    # why a run failed (status 'failed'), and the process that ran it (a 'running' row whose process is gone
    # is marked failed by the next run)
    "ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS reason VARCHAR",
    "ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS pid BIGINT",
    "ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS host VARCHAR",
    "ALTER TABLE train_stages ADD COLUMN IF NOT EXISTS reason VARCHAR",
    # true when a later evaluation of the (checkpoint, task) failed or was skipped: the score is from run_id
    "ALTER TABLE scores ADD COLUMN IF NOT EXISTS stale BOOLEAN DEFAULT false",
    # the question's slice, where its benchmark record carries one (the shapes world's sets do)
    "ALTER TABLE predictions ADD COLUMN IF NOT EXISTS object_size VARCHAR",
    "ALTER TABLE predictions ADD COLUMN IF NOT EXISTS small_text BOOLEAN",
]

WAREHOUSE_SCHEMA_VERSION = "3"

BOX_VIEWS = ("boxes", "box_rejects", "box_detections", "box_images")
_GLOB_CHARS = set("*?[]{}")


def default_path() -> Path:
    return mgllava_home() / WAREHOUSE_FILE


class WarehouseBusy(TimeoutError):
    """Another process held the warehouse file for longer than the caller would wait."""

    def __init__(self, path: str | Path, timeout: float, error: Exception):
        holder = re.search(r"held in (.+?) \(PID (\d+)\)", str(error))
        by = f"process {holder.group(2)} ({holder.group(1)})" if holder else "another process"
        super().__init__(f"the warehouse {path} is locked by {by}; waited {timeout:.1f} s: "
                         "try again when that process has finished")
        self.path = Path(path)


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text or "already open" in text


def open_with_retry(path: str | Path, read_only: bool = False, timeout: float = 30.0,
                    interval: float = 0.1) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect`` that waits (up to ``timeout`` s) while another process holds the file's lock.

    Raises :class:`WarehouseBusy` when the lock is still held after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_error(exc):
                raise
            if time.monotonic() >= deadline:
                raise WarehouseBusy(path, timeout, exc) from exc
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


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN; COMMIT when the block ends, ROLLBACK if it raises (a KeyboardInterrupt too)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table of :data:`TABLES` that is missing, add the :data:`MIGRATIONS` columns (idempotent)."""
    with transaction(con):
        for statement in TABLES + MIGRATIONS:
            con.execute(statement)
        con.execute(
            "INSERT INTO schema_info VALUES ('warehouse_schema_version', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [WAREHOUSE_SCHEMA_VERSION],
        )


def upgrade(path: str | Path, timeout: float = 30.0) -> None:
    """Bring the warehouse file at ``path`` to :data:`WAREHOUSE_SCHEMA_VERSION` if it is older.

    For readers, whose read-only connections cannot add the columns their queries name.
    """
    with open_with_retry(path, read_only=True, timeout=timeout) as con:
        version = con.execute(
            "SELECT value FROM schema_info WHERE key = 'warehouse_schema_version'").fetchone()
    if version != (WAREHOUSE_SCHEMA_VERSION,):
        connect(path, timeout=timeout).close()


TABLE_NAMES = frozenset(re.search(r"EXISTS (\w+)", statement).group(1) for statement in TABLES)


def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, data: pa.Table, replace: bool = False) -> None:
    """Insert the rows of ``data`` into the warehouse table ``table``, matching columns by name.

    One ``INSERT ... SELECT`` over the registered Arrow table: the rows go in as columns, not one
    statement per row. Columns of ``table`` missing from ``data`` get their defaults. ``replace``
    makes it ``INSERT OR REPLACE`` (rows with an existing primary key are replaced).
    """
    if table not in TABLE_NAMES:
        raise ValueError(f"{table!r} is not a warehouse table")
    view = f"_arrow_rows_{table}"
    con.register(view, data)
    try:
        con.execute(f"INSERT {'OR REPLACE ' if replace else ''}INTO {table} BY NAME SELECT * FROM {view}")
    finally:
        con.unregister(view)


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
    """Record a finished box table in ``box_runs`` and point the box views at it (one transaction each),
    once every shard matches the sha256 its manifest records (:meth:`detector.tables.BoxTable.verify`)."""
    from detector.tables import BoxTable

    BoxTable(box_dir).verify()
    with connect(path) as con:
        record_box_run(con, box_dir)
        create_box_views(con, box_dir)


class RefusedQuery(duckdb.PermissionException):
    """A user query that :func:`sandboxed_query` will not run (not exactly one read-only statement)."""


READ_ONLY_KINDS = "SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN of one of those"
_EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN\s*(\([^)]*\)\s*)?(ANALYZE\s+)?", re.IGNORECASE)


def read_only_statement(sql: str) -> str:
    """The single read-only statement in ``sql``, as DuckDB's own parser splits and classifies it.

    DuckDB parses WITH, FROM-first, VALUES, DESCRIBE, SHOW and SUMMARIZE as SELECT statements;
    an EXPLAIN passes when what it explains is one. Anything else raises :class:`RefusedQuery`.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise RefusedQuery(f"cannot parse the query: {first_line(exc)}") from exc
    if len(statements) != 1:
        raise RefusedQuery(f"give exactly one statement, not {len(statements)}")
    statement = statements[0]
    if statement.type == duckdb.StatementType.EXPLAIN:
        explained = _EXPLAIN_PREFIX.sub("", statement.query, count=1)
        if explained != statement.query:
            read_only_statement(explained)
            return statement.query
    if statement.type != duckdb.StatementType.SELECT:
        raise RefusedQuery(f"{statement.type.name} statements do not run here: only read-only queries "
                           f"({READ_ONLY_KINDS})")
    return statement.query


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message (DuckDB adds the query and a caret below it)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _box_table_dirs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The directories of the recorded box tables (what the box views read), each ending in ``/``."""
    dirs = set()
    for (out_dir,) in con.execute("SELECT out_dir FROM box_runs").fetchall():
        dirs.update({str(Path(out_dir)).rstrip("/") + "/", str(Path(out_dir).resolve()).rstrip("/") + "/"})
    return sorted(dirs)


def sandboxed_query(path: str | Path, sql: str, params: list | None = None,
                    timeout: float = 5.0) -> tuple[list[str], list[tuple]]:
    """Run one user-supplied read-only statement on the warehouse: ``(column names, rows)``.

    The statement is checked by :func:`read_only_statement`; the connection is read-only, with
    file access off except the recorded box-table directories (``box_runs.out_dir``, which the
    box views read), extensions neither installed nor autoloaded, and the configuration locked,
    so no statement can turn any of it back on. Refusals raise :class:`RefusedQuery`, a file or
    extension the query may not touch ``duckdb.PermissionException``.
    """
    statement = read_only_statement(sql)
    with open_with_retry(path, read_only=True, timeout=timeout) as con:
        for setting, value in (
            ("allowed_directories", _box_table_dirs(con)),
            ("enable_external_access", False),
            ("autoinstall_known_extensions", False),
            ("autoload_known_extensions", False),
            ("lock_configuration", True),
        ):
            con.execute(f"SET {setting} = ?", [value])
        cursor = con.execute(statement, params or [])
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], cursor.fetchall()
