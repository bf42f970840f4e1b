"""Training rows in the warehouse: one row per stage (``train_stages``), one per logged step (``train_steps``).

Each call opens the warehouse, writes in one transaction and closes it, so a
training job never holds DuckDB's single-writer lock between logging steps. A
resumed stage re-logs the steps after its checkpoint: rows are keyed by
``(run_id, stage, step)`` and replaced, never duplicated. Step rows go in as one
Arrow table per write (``INSERT OR REPLACE ... SELECT``), not a statement per row.

A busy warehouse never stops training: given a ``spool`` file (the stage's
pending writes, JSON lines), a write that cannot get the file within its wait
(:data:`STEP_WAIT` during the run, :data:`FINAL_WAIT` for the stage's end or
failure) is appended there instead, and the spool is loaded, in order and in the
same transaction, by the next write that gets the file (:func:`load_spool` loads
it alone). Loading a spool twice leaves the same rows: every write is a replace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from warehouse.db import connect, insert_arrow, transaction

log = logging.getLogger(__name__)

STEP_WAIT = 2.0  # seconds a stage start or step write waits for the warehouse before it is spooled
FINAL_WAIT = 30.0  # a stage's end or failure: the last chance of this process to load the spool

STEP_COLUMNS = {
    "run_id": pa.string(),
    "stage": pa.string(),
    "step": pa.int64(),
    "loss": pa.float64(),
    "lr": pa.float64(),
    "grad_norm": pa.float64(),
    "samples_per_s": pa.float64(),
    "tokens_per_s": pa.float64(),
    "skipped": pa.int64(),
    "logged_at": pa.timestamp("us", tz="UTC"),
}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def record_stage_start(run_id: str, stage: str, config, corpus_sha256: str, box_fingerprint: str,
                       spool: Path | None = None) -> bool:
    """Write the stage's row with status ``running``; False if it was spooled."""
    config_json = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    row = [run_id, stage, config.preset, config_json, hashlib.sha256(config_json.encode()).hexdigest(),
           corpus_sha256, config.data.boxes_dir, box_fingerprint, _now()]
    return _write({"op": "start", "row": row}, spool, STEP_WAIT)


def insert_train_steps(run_id: str, stage: str, metrics, spool: Path | None = None,
                       before_commit: Callable[[], None] | None = None) -> bool:
    """Write :class:`mgllava.train.engine.StepMetrics` rows (replacing re-logged steps); False if spooled.

    ``before_commit`` runs inside the transaction, after the rows are in (a fault-injection point).
    """
    now = _now()
    rows = [[run_id, stage, m.step, m.loss, m.lr, m.grad_norm, m.samples_per_s, m.tokens_per_s, m.skipped, now]
            for m in metrics]
    return _write({"op": "steps", "rows": rows}, spool, STEP_WAIT, before_commit)


def record_stage_end(run_id: str, stage: str, summary: dict, spool: Path | None = None) -> bool:
    """Mark the stage ``completed`` with its result; False if spooled."""
    keys = ("steps", "resumed_from", "final_loss", "checkpoint_dir", "trainable_weights", "export_dir", "records")
    values = [summary[k] for k in keys] + [
        json.dumps(summary["rejected_records"]),
        json.dumps(summary["skipped_samples"]),
        summary["images_without_boxes"],
    ]
    return _write({"op": "end", "run_id": run_id, "stage": stage, "at": _now(), "values": values}, spool, FINAL_WAIT)


def record_stage_failed(run_id: str, stage: str, reason: str, spool: Path | None = None) -> bool:
    """Mark a ``running`` stage ``failed`` with ``reason`` (a stage already marked keeps its status)."""
    op = {"op": "failed", "run_id": run_id, "stage": stage, "at": _now(), "reason": reason}
    return _write(op, spool, FINAL_WAIT)


def load_spool(spool: Path, wait: float = FINAL_WAIT) -> bool:
    """Load the pending writes of ``spool`` (if any) into the warehouse; False if it is still busy."""
    return _write(None, spool, wait)


# --------------------------------------------------------------------------- writing


def _apply(con, op: dict) -> None:
    kind = op["op"]
    if kind == "start":
        con.execute(
            """INSERT OR REPLACE INTO train_stages
               (run_id, stage, preset, config, config_sha256, corpus_sha256, boxes_dir, box_fingerprint,
                status, started_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)""",
            op["row"],
        )
    elif kind == "steps":
        columns = list(zip(*op["rows"]))
        columns[-1] = [datetime.fromisoformat(at) for at in columns[-1]]
        table = pa.table({name: pa.array(values, type) for (name, type), values in zip(STEP_COLUMNS.items(), columns)})
        insert_arrow(con, "train_steps", table, replace=True)
    elif kind == "end":
        con.execute(
            """UPDATE train_stages SET status = 'completed', finished_at = ?, steps = ?, resumed_from = ?,
               final_loss = ?, checkpoint_dir = ?, trainable_weights = ?, export_dir = ?, records = ?,
               rejected_records = ?, skipped_samples = ?, images_without_boxes = ?, reason = NULL
               WHERE run_id = ? AND stage = ?""",
            [op["at"], *op["values"], op["run_id"], op["stage"]],
        )
    elif kind == "failed":
        con.execute(
            """UPDATE train_stages SET status = 'failed', finished_at = ?, reason = ?
               WHERE run_id = ? AND stage = ? AND status = 'running'""",
            [op["at"], op["reason"], op["run_id"], op["stage"]],
        )
    else:
        raise ValueError(f"unknown spooled warehouse write {kind!r}")


def _read_spool(spool: Path | None) -> list[dict]:
    if spool is None or not spool.is_file():
        return []
    ops = []
    for number, line in enumerate(spool.read_text().splitlines(), 1):
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:  # torn by a kill while it was appended: that write is lost
            log.warning("%s line %d is not a whole record (the process stopped while writing it); skipped",
                        spool, number)
    return ops


def _append(spool: Path, op: dict) -> None:
    spool.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(spool, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(op) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(op: dict | None, spool: Path | None, wait: float, before_commit: Callable[[], None] | None = None) -> bool:
    """Apply the spooled writes, then ``op``, in one transaction; spool ``op`` if the warehouse is busy."""
    ops = _read_spool(spool) + ([op] if op else [])
    if not ops:
        return True
    try:
        with connect(timeout=wait) as con, transaction(con):
            for each in ops:
                _apply(con, each)
            if before_commit:
                before_commit()
    except TimeoutError as exc:
        if spool is None:
            raise
        if op:
            _append(spool, op)
        log.warning("%s; %d warehouse write(s) wait in %s", exc, len(ops), spool)
        return False
    if spool is not None:
        spool.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------- reading

STEPS_SQL = """SELECT stage, step, loss, lr FROM train_steps WHERE run_id IN (SELECT unnest(?))
ORDER BY stage DESC, step"""


def logged_steps(run_ids: list[str], db_path=None) -> list[tuple[str, int, float, float]]:
    """``(stage, step, loss, lr)`` of every logged step of the training runs ``run_ids`` (read-only)."""
    from warehouse.eval import read_only_query

    return read_only_query(STEPS_SQL, [list(run_ids)], db_path=db_path)[1]
