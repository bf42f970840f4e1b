"""Evaluation rows in the warehouse: runs, per-task outcomes, scores and per-sample predictions.

Tables (declared in :data:`warehouse.db.TABLES` and :data:`warehouse.db.MIGRATIONS`):

- ``eval_runs``: one row per evaluation run of one checkpoint (config, settings, counts, the
  process that ran it); ``status`` is ``running``, then ``completed`` or ``failed`` with a ``reason``;
- ``eval_tasks``: the latest outcome of each ``(checkpoint, task)``: ``completed``, ``failed``
  (``reason`` holds the error) or ``skipped`` (``reason`` says why), timings, box origins;
- ``scores``: one row per metric of the latest completed ``(checkpoint, task)``; ``stale`` is
  true when a later evaluation of it failed or was skipped (``run_id`` says which run scored it);
- ``predictions``: one row per evaluated sample (question, target, prediction, score, and the
  question's slice where its record carries one: ``object_size``, ``small_text``).

``checkpoint`` is the exported model directory's absolute path (what
``train_stages.export_dir`` holds, so scores join to training runs).

Writes are serialised: each call opens the warehouse, writes in one transaction and closes
it (DuckDB has one writer per file; :func:`warehouse.db.connect` waits for the lock), and a
process-wide lock keeps threads of one process from interleaving. :func:`write_task_result`
replaces a ``(checkpoint, task)``'s rows: DELETE then INSERT in the same transaction, so a
re-evaluation never duplicates rows and a reader never sees half of them; scores and
predictions go in as Arrow tables built before the file is opened, so the lock is held for
one bulk insert, not one statement per row. A failed or skipped outcome replaces only the
``eval_tasks`` row and marks the earlier scores stale.

A run never stays ``running`` after it ended: :func:`failure_recorded` marks it ``failed``
when anything raises (an interrupt too), with the benchmarks it never finished; a run whose
process died without a word (kill -9) is marked ``failed`` by the next run started on that host.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import psutil
import pyarrow as pa

from warehouse.db import connect, default_path, insert_arrow, sandboxed_query, transaction, upgrade

log = logging.getLogger(__name__)

_WRITE_LOCK = threading.Lock()

SCORE_TABLE_SQL = """
SELECT t.checkpoint, t.task, t.status, s.metric, s.value, s.n, s.stale, s.run_id AS score_run,
       t.evaluated_at, t.reason
FROM eval_tasks t LEFT JOIN scores s ON s.checkpoint = t.checkpoint AND s.task = t.task
WHERE (? IS NULL OR t.checkpoint = ?) AND (? IS NULL OR t.task = ?)
ORDER BY t.checkpoint, t.task, s.metric
"""

_TIMESTAMP = pa.timestamp("us", tz="UTC")
SCORE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("checkpoint", pa.string()), ("task", pa.string()), ("metric", pa.string()),
    ("value", pa.float64()), ("n", pa.int64()), ("evaluated_at", _TIMESTAMP), ("stale", pa.bool_()),
])
_PREDICTION_TEXT = ("question", "prompt", "target", "prediction", "box_origin")
PREDICTION_SCHEMA = pa.schema(
    [("run_id", pa.string()), ("checkpoint", pa.string()), ("task", pa.string()), ("doc_id", pa.int64()),
     ("score", pa.float64()), ("correct", pa.bool_()), ("n_boxes", pa.int64())]
    + [(name, pa.string()) for name in _PREDICTION_TEXT]
    + [("object_size", pa.string()), ("small_text", pa.bool_())]
)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _write(work: Callable[[duckdb.DuckDBPyConnection], None], db_path=None) -> None:
    """Run ``work(con)`` in one transaction on the warehouse, holding the file only for that."""
    with _WRITE_LOCK, connect(db_path) as con, transaction(con):
        work(con)


def record_run_start(run_id: str, checkpoint: str, config, tasks: list[str], boxes_dir: str | None,
                     detector: str | None, db_path=None) -> None:
    """Record the run as ``running`` (by this process); mark failed the runs whose process died."""
    now, host = _now(), socket.gethostname()

    def work(con):
        for abandoned, pid in _dead_runs(con, host):
            _fail_run(con, abandoned, f"its process {pid} on {host} ended without finishing (killed?)", now)
        con.execute(
            """INSERT OR REPLACE INTO eval_runs (run_id, checkpoint, preset, config, tasks, eval_limit, batch_size,
               max_new_tokens, boxes_dir, detector, status, started_at, pid, host)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)""",
            [run_id, checkpoint, config.preset, json.dumps(config.model_dump(mode="json")), json.dumps(tasks),
             config.eval.limit, config.eval.batch_size, config.eval.max_new_tokens, boxes_dir, detector, now,
             os.getpid(), host],
        )

    _write(work, db_path)


def _dead_runs(con, host: str) -> list[tuple[str, int]]:
    """``(run_id, pid)`` of the ``running`` runs of ``host`` whose process is gone (or its PID now another's)."""
    dead = []
    for run_id, pid, started_at in con.execute(
        "SELECT run_id, pid, started_at FROM eval_runs WHERE status = 'running' AND host = ? AND pid IS NOT NULL",
        [host],
    ).fetchall():
        try:
            process = psutil.Process(pid)
            alive = process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started_at.timestamp() + 1
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            dead.append((run_id, pid))
    return dead


def _task_outcome(con, run_id: str, checkpoint: str, result: dict, now: datetime) -> None:
    """Replace the ``eval_tasks`` row of ``result``; a failed or skipped one marks the older scores stale."""
    task, status = result["name"], result["status"]
    seconds = result.get("seconds") or 0.0
    con.execute("DELETE FROM eval_tasks WHERE checkpoint = ? AND task = ?", [checkpoint, task])
    con.execute(
        "INSERT INTO eval_tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [checkpoint, task, run_id, result.get("task"), status, result.get("reason") or None,
         result.get("data_dir"), result.get("n") or 0, seconds, result.get("generate_seconds") or 0.0,
         (result["n"] / seconds) if status == "completed" and seconds else None,
         json.dumps(result.get("box_origins") or {}), now],
    )
    if status != "completed":
        con.execute("UPDATE scores SET stale = true WHERE checkpoint = ? AND task = ?", [checkpoint, task])


def _score_rows(run_id: str, checkpoint: str, result: dict, now: datetime) -> tuple[pa.Table, pa.Table]:
    """The ``scores`` and ``predictions`` rows of a completed result, as Arrow tables."""
    metrics, predictions, task = sorted(result["metrics"].items()), result["predictions"], result["name"]
    scores = pa.Table.from_pydict({
        "run_id": [run_id] * len(metrics), "checkpoint": [checkpoint] * len(metrics), "task": [task] * len(metrics),
        "metric": [m for m, _ in metrics], "value": [v for _, v in metrics], "n": [result["n"]] * len(metrics),
        "evaluated_at": [now] * len(metrics), "stale": [False] * len(metrics),
    }, schema=SCORE_SCHEMA)
    n = len(predictions)
    preds = pa.Table.from_pydict({
        "run_id": [run_id] * n, "checkpoint": [checkpoint] * n, "task": [task] * n,
        "doc_id": [p["doc_id"] for p in predictions],
        "score": [p["score"] for p in predictions],
        "correct": [None if p["score"] is None else p["score"] >= 1.0 for p in predictions],
        "n_boxes": [p["n_boxes"] for p in predictions],
        **{name: [p[name] for p in predictions] for name in _PREDICTION_TEXT},
        **{name: [p.get(name) for p in predictions] for name in ("object_size", "small_text")},
    }, schema=PREDICTION_SCHEMA)
    return scores, preds


def write_task_result(run_id: str, checkpoint: str, result: dict, db_path=None) -> None:
    """Store one benchmark's outcome (:meth:`mgllava.eval.runner.BenchmarkResult.to_json`)."""
    now = _now()
    rows = _score_rows(run_id, checkpoint, result, now) if result["status"] == "completed" else None

    def work(con):
        _task_outcome(con, run_id, checkpoint, result, now)
        if rows:
            for table, data in zip(("scores", "predictions"), rows):
                con.execute(f"DELETE FROM {table} WHERE checkpoint = ? AND task = ?", [checkpoint, result["name"]])
                insert_arrow(con, table, data)

    _write(work, db_path)


def _set_run_end(con, run_id: str, status: str, reason: str | None, now: datetime) -> None:
    con.execute(
        """UPDATE eval_runs SET status = $1, reason = $2, finished_at = $3,
           n_completed = (SELECT count(*) FILTER (status = 'completed') FROM eval_tasks WHERE run_id = $4),
           n_failed = (SELECT count(*) FILTER (status = 'failed') FROM eval_tasks WHERE run_id = $4),
           n_skipped = (SELECT count(*) FILTER (status = 'skipped') FROM eval_tasks WHERE run_id = $4)
           WHERE run_id = $4""",
        [status, reason, now, run_id],
    )


def record_run_end(run_id: str, results: list[dict], db_path=None) -> None:
    """Close the run: ``completed``, or ``failed`` naming the benchmarks that failed."""
    failed = [r["name"] for r in results if r["status"] == "failed"]
    reason = f"{len(failed)} of {len(results)} benchmarks failed: {', '.join(failed)}" if failed else None
    _write(lambda con: _set_run_end(con, run_id, "failed" if failed else "completed", reason, _now()), db_path)


def _fail_run(con, run_id: str, reason: str, now: datetime) -> None:
    """Mark ``run_id`` failed; each of its benchmarks without an outcome from it fails with ``reason``."""
    row = con.execute("SELECT checkpoint, tasks FROM eval_runs WHERE run_id = ?", [run_id]).fetchone()
    if row is None:
        return
    checkpoint, tasks = row[0], json.loads(row[1] or "[]")
    finished = {t for (t,) in con.execute(
        "SELECT task FROM eval_tasks WHERE run_id = ? AND checkpoint = ?", [run_id, checkpoint]).fetchall()}
    for task in tasks:
        if task not in finished:
            _task_outcome(con, run_id, checkpoint, {
                "name": task, "status": "failed", "reason": f"the evaluation run ended before it: {reason}"}, now)
    _set_run_end(con, run_id, "failed", reason, now)


def record_run_failed(run_id: str, reason: str, db_path=None) -> None:
    """Mark the run failed with ``reason`` (see :func:`_fail_run`)."""
    _write(lambda con: _fail_run(con, run_id, reason, _now()), db_path)


@contextmanager
def failure_recorded(run_id: str, db_path=None) -> Iterator[None]:
    """Mark the run failed, with the error as its reason, if the block raises anything (an interrupt too)."""
    try:
        yield
    except BaseException as exc:
        try:
            record_run_failed(run_id, f"{type(exc).__name__}: {exc}", db_path=db_path)
        except Exception as err:  # e.g. the warehouse is busy: the original error matters more
            log.error("could not record the failure of evaluation run %s: %s", run_id, err)
        raise


def read_only_query(sql: str, params: list | None = None, db_path=None,
                    timeout: float = 30.0) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement (:func:`warehouse.db.sandboxed_query`): ``(column names, rows)``.

    Anything but one read-only statement raises :class:`warehouse.db.RefusedQuery`; a warehouse
    held by another process for ``timeout`` s raises :class:`warehouse.db.WarehouseBusy`.
    """
    path = Path(db_path).expanduser() if db_path else default_path()
    if not path.exists():
        raise FileNotFoundError(f"no warehouse at {path} yet: evaluate a checkpoint first")
    upgrade(path, timeout=timeout)
    return sandboxed_query(path, sql, params, timeout=timeout)


SCORE_HISTORY_SQL = "SELECT evaluated_at, task, metric, value FROM scores WHERE value IS NOT NULL ORDER BY evaluated_at"


def score_history(db_path=None, timeout: float = 30.0) -> list[tuple]:
    """``(evaluated_at, task, metric, value)`` of every score in the warehouse, oldest first."""
    return read_only_query(SCORE_HISTORY_SQL, db_path=db_path, timeout=timeout)[1]


def score_table(checkpoint: str | None = None, task: str | None = None, db_path=None, timeout: float = 30.0):
    """The score table: one row per checkpoint, task and metric; failed/skipped tasks with their reason,
    and ``stale`` true on a score that a later failed or skipped evaluation left standing."""
    return read_only_query(SCORE_TABLE_SQL, [checkpoint, checkpoint, task, task], db_path=db_path, timeout=timeout)
