"""Training rows in the warehouse: one row per stage (``train_stages``), one per logged step (``train_steps``).

Each call opens the warehouse, writes in one transaction and closes it, so a
training job never holds DuckDB's single-writer lock between logging steps. A
resumed stage re-logs the steps after its checkpoint: rows are keyed by
``(run_id, stage, step)`` and replaced, never duplicated.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from warehouse.db import connect


def _now() -> datetime:
    return datetime.now(timezone.utc)


def record_stage_start(run_id: str, stage: str, config, corpus_sha256: str, box_fingerprint: str) -> None:
    config_json = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    with connect() as con:
        con.execute(
            """INSERT OR REPLACE INTO train_stages
               (run_id, stage, preset, config, config_sha256, corpus_sha256, boxes_dir, box_fingerprint,
                status, started_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)""",
            [
                run_id,
                stage,
                config.preset,
                config_json,
                hashlib.sha256(config_json.encode()).hexdigest(),
                corpus_sha256,
                config.data.boxes_dir,
                box_fingerprint,
                _now(),
            ],
        )


def insert_train_steps(run_id: str, stage: str, metrics) -> None:
    """Write :class:`mgllava.train.engine.StepMetrics` rows (replacing re-logged steps)."""
    now = _now()
    rows = [
        [run_id, stage, m.step, m.loss, m.lr, m.grad_norm, m.samples_per_s, m.tokens_per_s, m.skipped, now]
        for m in metrics
    ]
    with connect() as con:
        con.executemany("INSERT OR REPLACE INTO train_steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def record_stage_end(run_id: str, stage: str, summary: dict) -> None:
    with connect() as con:
        con.execute(
            """UPDATE train_stages SET status = 'completed', finished_at = ?, steps = ?, resumed_from = ?,
               final_loss = ?, checkpoint_dir = ?, trainable_weights = ?, export_dir = ?, records = ?,
               rejected_records = ?, skipped_samples = ?, images_without_boxes = ?
               WHERE run_id = ? AND stage = ?""",
            [
                _now(),
                summary["steps"],
                summary["resumed_from"],
                summary["final_loss"],
                summary["checkpoint_dir"],
                summary["trainable_weights"],
                summary["export_dir"],
                summary["records"],
                json.dumps(summary["rejected_records"]),
                json.dumps(summary["skipped_samples"]),
                summary["images_without_boxes"],
                run_id,
                stage,
            ],
        )
