"""The DuckDB warehouse: schema creation, box views over Parquet, quoting, lock retries."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detector import schema
from detector.tables import sha256_file
from warehouse import db


def write_box_table(out, rows, rejects):
    """A box table like the detection stage writes, without running a detector."""
    (out / "boxes").mkdir(parents=True)
    (out / "rejects").mkdir(parents=True)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for shard, chunk in enumerate([rows[:2], rows[2:]]):
        cols = {f.name: [] for f in schema.BOXES_FIELDS}
        for key, boxes in chunk:
            for c, v in (("image_key", key), ("width", 100), ("height", 80), ("sha256", "0" * 64),
                         ("boxes", [dict(x1=1.0, y1=2.0, x2=30.0, y2=40.0, score=0.9, label=lb) for lb in boxes]),
                         ("detector", "YOLO:t"), ("weights_sha256", "ab"), ("params", "{}"), ("detected_at", now),
                         ("shard", shard)):
                cols[c].append(v)
        pq.write_table(pa.Table.from_pydict(cols, schema=schema.boxes_schema("fp", shard)),
                       out / "boxes" / f"part-{shard:05d}.parquet")
        rcols = {f.name: [] for f in schema.REJECTS_FIELDS}
        for key, reason in (rejects if shard == 0 else []):
            for c, v in (("image_key", key), ("reason", reason), ("detail", "d"), ("path", "/x"),
                         ("detector", "YOLO:t"), ("weights_sha256", "ab"), ("detected_at", now), ("shard", shard)):
                rcols[c].append(v)
        pq.write_table(pa.Table.from_pydict(rcols, schema=schema.rejects_schema("fp", shard)),
                       out / "rejects" / f"part-{shard:05d}.parquet")


def write_manifest(out, **fields) -> dict:
    """A finished run's ``manifest.json`` for the table in ``out``, with each shard's recorded sha256."""
    shards = []
    for part in sorted((out / "boxes").glob("*.parquet")):
        shard = {}
        for kind in ("boxes", "rejects"):
            shard[f"{kind}_file"] = f"{kind}/{part.name}"
            shard[f"{kind}_sha256"] = sha256_file(out / kind / part.name)
        shards.append(shard)
    manifest = {"fingerprint": "fp", "status": "complete", "schema_version": "1",
                "detector": {"name": "YOLO:t", "weights_sha256": "ab", "params": {}},
                "totals": {"images": 5, "rows": 4, "rejects": 1, "boxes": 5}, "shards": shards, **fields}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


ROWS = [("a.png", ["circle", "circle", "star"]), ("b.png", []), ("c.png", ["square"]), ("d.png", [])]


def test_default_path_and_idempotent_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("MGLLAVA_HOME", str(tmp_path / "home"))
    assert db.default_path() == tmp_path / "home" / "warehouse.duckdb"
    con = db.connect()
    db.ensure_schema(con)  # again: no error, no duplicate rows
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"schema_info", "box_runs"} <= tables
    assert con.execute("SELECT count(*) FROM schema_info").fetchone()[0] == 1
    con.close()
    ro = db.connect(read_only=True)
    assert ro.execute("SELECT value FROM schema_info WHERE key = ?", ["warehouse_schema_version"]).fetchone()
    ro.close()


def test_sql_string_quotes():
    assert db.sql_string("it's") == "'it''s'"
    assert duckdb.connect().execute("SELECT " + db.sql_string("a'b''c")).fetchone()[0] == "a'b''c"
    with pytest.raises(ValueError):
        db.sql_string("a\x00b")


@pytest.mark.parametrize("dirname", ["plain", "o'brien [v1] *x*"])
def test_box_views_answer_queries(tmp_path, dirname):
    out = tmp_path / dirname
    write_box_table(out, ROWS, [("e.png", "empty"), ("f.png", "missing")])
    con = db.connect(tmp_path / "w.duckdb")
    db.create_box_views(con, out)
    db.create_box_views(con, out)  # re-creating is fine
    per_label = con.execute(
        "SELECT label, count(*) FROM box_detections GROUP BY label ORDER BY label").fetchall()
    assert per_label == [("circle", 2), ("square", 1), ("star", 1)]
    empty = con.execute("SELECT image_key FROM box_images WHERE n_boxes = 0 ORDER BY image_key").fetchall()
    assert empty == [("b.png",), ("d.png",)]
    assert con.execute("SELECT labels FROM box_images WHERE image_key = ?", ["a.png"]).fetchone()[0] == [
        "circle", "star"]
    assert con.execute("SELECT count(*) FROM boxes").fetchone()[0] == 4
    assert con.execute("SELECT reason FROM box_rejects ORDER BY image_key").fetchall() == [("empty",), ("missing",)]
    assert con.execute("SELECT max(box_index) FROM box_detections WHERE image_key = 'a.png'").fetchone()[0] == 3
    con.close()


def test_record_box_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    manifest = {"fingerprint": "f1", "status": "complete", "schema_version": "1",
                "detector": {"name": "YOLO:t", "weights_sha256": "ab", "params": {"conf": 0.25}},
                "totals": {"images": 5, "rows": 4, "rejects": 1, "boxes": 7},
                "created_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:01:00+00:00"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    con = db.connect(tmp_path / "w.duckdb")
    db.record_box_run(con, out)
    db.record_box_run(con, out)  # idempotent
    assert con.execute("SELECT n_images, n_boxes, params->>'conf' FROM box_runs").fetchall() == [(5, 7, "0.25")]
    con.close()


def test_connect_waits_for_a_lock_holder(tmp_path):
    path = tmp_path / "w.duckdb"
    db.connect(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import duckdb, time, sys; c = duckdb.connect({str(path)!r}); print('locked', flush=True); "
         "time.sleep(float(sys.argv[1])); c.close()", "3"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TimeoutError, match="locked"):
            db.connect(path, timeout=0.5)
        t0 = time.monotonic()
        con = db.connect(path, timeout=30)
        assert time.monotonic() - t0 > 0.5
        assert con.execute("SELECT 1").fetchone() == (1,)
        con.close()
    finally:
        holder.wait(timeout=30)
