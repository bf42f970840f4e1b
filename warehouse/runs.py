"""The runs recorded in the warehouse, newest first: box tables, training stages and evaluations
(what ``mgllava status`` lists)."""

from __future__ import annotations

from pathlib import Path

from warehouse.db import default_path, open_with_retry

LAST_RUNS_SQL = """
SELECT kind, run, status, updated, what FROM (
    SELECT 'detect' AS kind, left(fingerprint, 12) AS run, 'complete' AS status, finished_at AS updated,
           out_dir AS what FROM box_runs
    UNION ALL
    SELECT 'train ' || stage, run_id, status, coalesce(finished_at, started_at),
           coalesce(export_dir, checkpoint_dir) FROM train_stages
    UNION ALL
    SELECT 'evaluate', run_id, status, coalesce(finished_at, started_at), checkpoint FROM eval_runs
) ORDER BY updated DESC NULLS LAST LIMIT ?
"""
COLUMNS = ["kind", "run", "status", "updated", "what"]


def last_runs(path: str | Path | None = None, limit: int = 5, timeout: float = 5.0) -> list[tuple]:
    """The ``limit`` latest runs as ``(kind, run, status, updated, what)`` rows (:data:`COLUMNS`); none
    when the warehouse file does not exist yet. Opens the file read-only."""
    path = Path(path).expanduser() if path else default_path()
    if not path.is_file():
        return []
    with open_with_retry(path, read_only=True, timeout=timeout) as con:
        return con.execute(LAST_RUNS_SQL, [limit]).fetchall()
