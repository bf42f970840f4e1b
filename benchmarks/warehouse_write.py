"""How long one evaluation write holds the DuckDB warehouse's lock (issue 18).

Writes one benchmark result with N per-sample predictions through
:func:`warehouse.eval.write_task_result` into a fresh warehouse file, twice (the
second write replaces the first: DELETE then INSERT), and times the part that
holds the file: :func:`warehouse.eval._write`, from opening the file to closing it.
For reference it then inserts the same predictions one statement per row
(``executemany``, how they went in before the Arrow bulk insert) into a scratch
table. Prints one line per measurement and ends with one JSON line.

    .venv/bin/python benchmarks/warehouse_write.py [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from warehouse import eval as wh


def result(n: int) -> dict:
    predictions = [dict(doc_id=i, question=f"Is there a circle in image {i}?", prompt="<image>\nIs there...",
                        target="yes", prediction="no", score=float(i % 2), n_boxes=3, box_origin="table")
                   for i in range(n)]
    return dict(name="pope", task="pope_mgllava", status="completed", reason="", data_dir="/d", n=n,
                metrics={"acc": 0.5, "f1": 0.5}, predictions=predictions, seconds=1.0, generate_seconds=1.0,
                box_origins={"table": n})


def row_by_row(db: Path, n: int) -> float:
    """Seconds to insert the predictions of :func:`result` with one INSERT per row, in one transaction."""
    data = wh._score_rows("ref", "/ckpt", result(n), datetime.now(timezone.utc))[1]
    rows = list(zip(*(column.to_pylist() for column in data.columns)))
    with duckdb.connect(str(db)) as con:
        con.register("schema_only", data.slice(0, 0))
        con.execute("CREATE TEMP TABLE scratch AS SELECT * FROM schema_only")
        t0 = time.perf_counter()
        con.execute("BEGIN TRANSACTION")
        con.executemany(f"INSERT INTO scratch VALUES ({', '.join('?' * len(data.columns))})", rows)
        con.execute("COMMIT")
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="predictions per write")
    args = parser.parse_args()
    held: list[float] = []
    original = wh._write

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            held.append(time.perf_counter() - t0)

    wh._write = timed
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "w.duckdb"
        for label, run_id in (("first write", "r1"), ("replacing write", "r2")):
            t0 = time.perf_counter()
            wh.write_task_result(run_id, "/ckpt", result(args.n), db_path=db)
            print(f"{label}: {args.n} predictions, lock held {held[-1]:.3f} s "
                  f"(call {time.perf_counter() - t0:.3f} s)")
        reference = row_by_row(db, args.n)
    print(f"row by row (executemany): {reference:.3f} s, {reference / max(held):.0f}x the longest bulk write")
    print(json.dumps({"benchmark": "warehouse_write", "predictions": args.n,
                      "lock_held_s": [round(s, 4) for s in held], "row_by_row_s": round(reference, 4),
                      "ratio": round(reference / max(held), 1)}))


if __name__ == "__main__":
    main()
