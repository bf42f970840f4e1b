"""Evaluation rows in the warehouse: runs, per-task outcomes, scores and per-sample predictions.

Tables (declared in :data:`warehouse.db.TABLES`):

- ``eval_runs``: one row per evaluation run of one checkpoint (config, settings, counts);
- ``eval_tasks``: the latest outcome of each ``(checkpoint, task)``: ``completed``, ``failed``
  (``reason`` holds the error) or ``skipped`` (``reason`` says why), timings, box origins;
- ``scores``: one row per metric of a completed ``(checkpoint, task)``;
- ``predictions``: one row per evaluated sample (question, target, prediction, score).

``checkpoint`` is the exported model directory's absolute path (what
``train_stages.export_dir`` holds, so scores join to training runs).

Writes are serialised: each call opens the warehouse, writes in one transaction and closes
it (DuckDB has one writer per file; :func:`warehouse.db.connect` waits for the lock), and a
process-wide lock keeps threads of one process from interleaving. :func:`write_task_result`
replaces a ``(checkpoint, task)``'s rows: DELETE then INSERT in the same transaction, so a
re-evaluation never duplicates rows and a reader never sees half of them. A failed or
skipped outcome replaces only the ``eval_tasks`` row: scores and predictions of an earlier
completed evaluation of that checkpoint stay (their ``run_id`` says which run made them).
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

from warehouse.db import connect, default_path

_WRITE_LOCK = threading.Lock()

SCORE_TABLE_SQL = """
SELECT t.checkpoint, t.task, t.status, s.metric, s.value, s.n, t.evaluated_at, t.reason
FROM eval_tasks t LEFT JOIN scores s ON s.checkpoint = t.checkpoint AND s.task = t.task
WHERE (? IS NULL OR t.checkpoint = ?) AND (? IS NULL OR t.task = ?)
ORDER BY t.checkpoint, t.task, s.metric
"""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _write(statements: list[tuple[str, list]], many: list[tuple[str, list[list]]] = (), db_path=None) -> None:
    with _WRITE_LOCK, connect(db_path) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            for sql, params in statements:
                con.execute(sql, params)
            for sql, rows in many:
                if rows:
                    con.executemany(sql, rows)
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise


def record_run_start(run_id: str, checkpoint: str, config, tasks: list[str], boxes_dir: str | None,
                     detector: str | None, db_path=None) -> None:
    _write([(
        """INSERT OR REPLACE INTO eval_runs (run_id, checkpoint, preset, config, tasks, eval_limit, batch_size,
           max_new_tokens, boxes_dir, detector, status, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)""",
        [run_id, checkpoint, config.preset, json.dumps(config.model_dump(mode="json")), json.dumps(tasks),
         config.eval.limit, config.eval.batch_size, config.eval.max_new_tokens, boxes_dir, detector, _now()],
    )], db_path=db_path)


def write_task_result(run_id: str, checkpoint: str, result: dict, db_path=None) -> None:
    """Store one benchmark's outcome (:meth:`mgllava.eval.runner.BenchmarkResult.to_json`)."""
    now, task, status = _now(), result["name"], result["status"]
    seconds = result.get("seconds") or 0.0
    statements = [
        ("DELETE FROM eval_tasks WHERE checkpoint = ? AND task = ?", [checkpoint, task]),
        (
            """INSERT INTO eval_tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [checkpoint, task, run_id, result.get("task"), status, result.get("reason") or None,
             result.get("data_dir"), result.get("n") or 0, seconds, result.get("generate_seconds") or 0.0,
             (result["n"] / seconds) if status == "completed" and seconds else None,
             json.dumps(result.get("box_origins") or {}), now],
        ),
    ]
    many = []
    if status == "completed":
        statements += [
            ("DELETE FROM scores WHERE checkpoint = ? AND task = ?", [checkpoint, task]),
            ("DELETE FROM predictions WHERE checkpoint = ? AND task = ?", [checkpoint, task]),
        ]
        many = [
            ("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?)",
             [[run_id, checkpoint, task, metric, value, result["n"], now]
              for metric, value in sorted(result["metrics"].items())]),
            ("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             [[run_id, checkpoint, task, p["doc_id"], p["question"], p["prompt"], p["target"], p["prediction"],
               p["score"], None if p["score"] is None else p["score"] >= 1.0, p["n_boxes"], p["box_origin"]]
              for p in result["predictions"]]),
        ]
    _write(statements, many, db_path=db_path)


def record_run_end(run_id: str, results: list[dict], db_path=None) -> None:
    counts = {s: sum(r["status"] == s for r in results) for s in ("completed", "failed", "skipped")}
    _write([(
        """UPDATE eval_runs SET status = ?, finished_at = ?, n_completed = ?, n_failed = ?, n_skipped = ?
           WHERE run_id = ?""",
        ["failed" if counts["failed"] else "completed", _now(), counts["completed"], counts["failed"],
         counts["skipped"], run_id],
    )], db_path=db_path)


def read_only_query(sql: str, params: list | None = None, db_path=None) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` on a read-only connection: ``(column names, rows)``. Writes raise ``duckdb.Error``."""
    path = Path(db_path).expanduser() if db_path else default_path()
    if not path.exists():
        raise FileNotFoundError(f"no warehouse at {path} yet: evaluate a checkpoint first")
    with connect(path, read_only=True) as con:
        cursor = con.execute(sql, params or [])
        if cursor.description is None:
            return [], []
        return [d[0] for d in cursor.description], cursor.fetchall()


def score_table(checkpoint: str | None = None, task: str | None = None, db_path=None):
    """The score table (one row per checkpoint, task and metric; failed/skipped tasks with their reason)."""
    return read_only_query(SCORE_TABLE_SQL, [checkpoint, checkpoint, task, task], db_path=db_path)
