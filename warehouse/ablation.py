"""Ablation rows in the warehouse, and the one query that turns them into the ablation table.

``ablation_variants`` holds one row per trained variant of an ablation (``mgllava ablate``):
its name (``low``, ``low+high``, ...), granularities, seed, the baseline variant its deltas are
taken against, and its export directory, which joins the per-question ``predictions`` rows of its
evaluation on ``checkpoint``.

:data:`ABLATION_SQL` (documented in ``docs/warehouse.md``) gives, for the latest ablation, one row
per variant x benchmark x slice (benchmark ``(all)``: every benchmark's questions together): the
number of answered questions ``n`` (over all seeds), the accuracy (mean per-question score) with its
standard error ``sqrt(p(1-p)/n)``, and, for the variants other than the baseline, the delta to the
baseline on the same benchmark and slice with its standard error from the numbers of questions,
``sqrt(p(1-p)/n + p0(1-p0)/n0)`` (two independent binomial proportions; a variant's seeds are
pooled, so it leaves out the spread between seeds). Slices: ``all``, ``object:small``,
``object:medium``, ``object:large`` (the size class of the object asked about) and ``small text``
(questions about the small rendered number), from ``predictions.object_size`` and
``predictions.small_text``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from warehouse.db import connect, default_path, sandboxed_query, transaction, upgrade

LATEST_ABLATION = "(SELECT ablation_id FROM ablation_variants ORDER BY recorded_at DESC LIMIT 1)"

_TABLE_SQL = """
WITH answered AS (
    SELECT a.ablation_id, a.variant, a.baseline, p.task AS benchmark, p.score,
           unnest(['all']
                  || CASE WHEN p.object_size IS NULL THEN [] ELSE ['object:' || p.object_size] END
                  || CASE WHEN p.small_text THEN ['small text'] ELSE [] END) AS slice
    FROM ablation_variants a JOIN predictions p ON p.checkpoint = a.checkpoint
    WHERE a.ablation_id = {ablation}
      AND p.score IS NOT NULL
),
pooled AS (
    SELECT * FROM answered
    UNION ALL SELECT * REPLACE ('(all)' AS benchmark) FROM answered
),
accuracy AS (
    SELECT ablation_id, variant, baseline, benchmark, slice, count(*) AS n, avg(score) AS accuracy
    FROM pooled GROUP BY ALL
)
SELECT v.ablation_id, v.variant, v.benchmark, v.slice, v.n, v.accuracy,
       sqrt(v.accuracy * (1 - v.accuracy) / v.n) AS accuracy_se,
       CASE WHEN v.variant <> v.baseline THEN v.accuracy - b.accuracy END AS delta,
       CASE WHEN v.variant <> v.baseline
            THEN sqrt(v.accuracy * (1 - v.accuracy) / v.n + b.accuracy * (1 - b.accuracy) / b.n) END AS delta_se
FROM accuracy v LEFT JOIN accuracy b
  ON b.ablation_id = v.ablation_id AND b.variant = v.baseline AND b.benchmark = v.benchmark AND b.slice = v.slice
ORDER BY v.benchmark, list_position(['all', 'object:small', 'object:medium', 'object:large', 'small text'], v.slice),
         length(v.variant), v.variant
"""

ABLATION_SQL = _TABLE_SQL.format(ablation=LATEST_ABLATION).strip()
"""The ablation table of the latest ablation: the query ``docs/warehouse.md`` documents."""

ABLATION_BY_ID_SQL = _TABLE_SQL.format(ablation=f"coalesce(?, {LATEST_ABLATION})").strip()
"""The same for the ablation given as the parameter (NULL: the latest)."""

COLUMNS = ["ablation_id", "variant", "benchmark", "slice", "n", "accuracy", "accuracy_se", "delta", "delta_se"]


def record_variant(ablation_id: str, variant: str, granularities: list[str], seed: int, baseline: str,
                   checkpoint: str, config, db_path=None) -> None:
    """Record (or replace) one trained variant of ``ablation_id``; ``checkpoint`` is its export directory."""
    with connect(db_path) as con, transaction(con):
        con.execute(
            "INSERT OR REPLACE INTO ablation_variants VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [ablation_id, variant, json.dumps(granularities), seed, baseline, str(Path(checkpoint).resolve()),
             config.preset, json.dumps(config.model_dump(mode="json")), datetime.now(timezone.utc)],
        )


def ablation_table(ablation_id: str | None = None, db_path=None, timeout: float = 30.0) -> list[dict]:
    """The ablation table of ``ablation_id`` (default: the latest) as dicts (:data:`COLUMNS`), read-only."""
    path = Path(db_path).expanduser() if db_path else default_path()
    if not path.exists():
        raise FileNotFoundError(f"no warehouse at {path} yet: run mgllava ablate first")
    upgrade(path, timeout=timeout)
    columns, rows = sandboxed_query(path, ABLATION_BY_ID_SQL, [ablation_id], timeout=timeout)
    return [dict(zip(columns, row)) for row in rows]
