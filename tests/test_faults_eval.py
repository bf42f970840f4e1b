"""Fault injection on evaluation: kill -9 a warehouse writer, restart, and check nothing is lost or half there.

- a writer killed inside its transaction (after the predictions' bulk insert, before COMMIT) leaves
  the earlier rows whole and none of its own; its run is marked failed by the next run; the redo
  stores every score and prediction row once;
- writers killed at arbitrary moments of a series of writes leave only whole benchmarks, and
  the redo completes them;
- the evaluation flow whose model fails to load, or whose warehouse write fails, ends ``failed``
  with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from warehouse import eval as wh

CHILD = textwrap.dedent("""
    import json, sys, time
    from mgllava.config import load_config
    from warehouse import eval as wh

    db, run_id, tasks, n, pause = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    if pause == "after-insert":  # stop inside the transaction, after the predictions went in
        insert = wh.insert_arrow
        def insert_then_wait(con, table, data, replace=False):
            insert(con, table, data, replace)
            if table == "predictions":
                print("inside the transaction", flush=True)
                time.sleep(60)
        wh.insert_arrow = insert_then_wait
    wh.record_run_start(run_id, "/ckpt", load_config(preset="tiny"), tasks, None, None, db_path=db)
    print("started", flush=True)
    results = []
    for task in tasks:
        results.append(dict(name=task, task=task, status="completed", reason="", n=n, metrics={"acc": 0.5, "f1": 0.5},
                            seconds=1.0, predictions=[dict(doc_id=i, question="q", prompt="p", target="yes",
                            prediction="no", score=1.0, n_boxes=1, box_origin="table") for i in range(n)]))
        wh.write_task_result(run_id, "/ckpt", results[-1], db_path=db)
    wh.record_run_end(run_id, results, db_path=db)
""")


def _writer(db, run_id, tasks, n, pause="none") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(db), run_id, json.dumps(tasks), str(n), pause],
                            stdout=subprocess.PIPE, text=True)


def _q(db, sql):
    return wh.read_only_query(sql, db_path=db)[1]


def _whole(db) -> dict[str, int]:
    """Per task, the number of predictions; asserts every stored task is whole (no partial rows)."""
    tasks = dict(_q(db, "SELECT task, n FROM eval_tasks WHERE status = 'completed'"))
    preds = dict(_q(db, "SELECT task, count(*) FROM predictions GROUP BY 1"))
    scores = dict(_q(db, "SELECT task, count(*) FROM scores GROUP BY 1"))
    assert preds == tasks and scores == {t: 2 for t in tasks}
    assert _q(db, "SELECT count(*) = count(DISTINCT (task, doc_id)) FROM predictions") == [(True,)]
    return preds


def test_writer_killed_inside_its_transaction(tmp_path, fault_ledger):
    db = tmp_path / "wh.duckdb"
    assert _writer(db, "r1", ["pope", "mmbench"], 300).wait(timeout=60) == 0
    writer = _writer(db, "r2", ["pope"], 5000, pause="after-insert")
    assert writer.stdout.readline().strip() == "started"
    assert writer.stdout.readline().strip() == "inside the transaction"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()

    # the killed write left nothing: r1's rows are whole, r2 wrote none; r2 still says running
    assert _whole(db) == {"pope": 300, "mmbench": 300}
    assert _q(db, "SELECT DISTINCT run_id FROM predictions") == [("r1",)]
    assert dict(_q(db, "SELECT run_id, status FROM eval_runs")) == {"r1": "completed", "r2": "running"}

    # the redo (a new run): r2 is marked failed, every row present once
    assert _writer(db, "r3", ["pope"], 5000).wait(timeout=60) == 0
    assert _whole(db) == {"pope": 5000, "mmbench": 300}
    assert dict(_q(db, "SELECT task, run_id FROM eval_tasks")) == {"pope": "r3", "mmbench": "r1"}
    runs = {r: (s, reason) for r, s, reason in _q(db, "SELECT run_id, status, reason FROM eval_runs")}
    assert runs["r3"] == ("completed", None) and runs["r2"][0] == "failed"
    assert f"process {writer.pid}" in runs["r2"][1] and "ended without finishing" in runs["r2"][1]
    assert _q(db, "SELECT count(*) FILTER (stale) FROM scores") == [(0,)]
    fault_ledger.record("kill -9 evaluation writer inside its transaction", True, rows_lost=0)


@pytest.mark.slow
def test_writers_killed_at_arbitrary_moments(tmp_path, fault_ledger):
    db = tmp_path / "wh.duckdb"
    tasks = [f"t{i}" for i in range(12)]
    kills = 0
    for attempt, delay in enumerate((0.15, 0.4, 0.8)):
        writer = _writer(db, f"killed{attempt}", tasks, 20_000)
        assert writer.stdout.readline().strip() == "started"
        try:
            writer.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
            kills += 1
            fault_ledger.record(f"kill -9 evaluation writer after {delay} s of writes", True, rows_lost=0)
        assert set(_whole(db)) <= set(tasks)  # whatever got in is whole
    assert kills > 0  # 12 writes of 20k predictions outlast at least the first kill
    assert _writer(db, "redo", tasks, 20_000).wait(timeout=300) == 0
    assert _whole(db) == {t: 20_000 for t in tasks}
    statuses = dict(_q(db, "SELECT run_id, status FROM eval_runs"))
    assert statuses["redo"] == "completed"
    # each killed run is failed (marked by the next start), unless it finished before its kill
    assert all(statuses[f"killed{i}"] in ("failed", "completed") for i in range(3))


# ----------------------------------------------------------------------------- the flow's failure paths



@pytest.mark.slow
def test_flow_failures_end_the_run_failed(prefect_server, tmp_path, monkeypatch, fault_ledger):
    from flows.evaluate import evaluate
    from mgllava.model.configuration_mgllava import EXPORT_CONFIG
    from warehouse import eval as warehouse_eval

    model = tmp_path / "model"
    model.mkdir()
    (model / EXPORT_CONFIG).write_text("{not json")  # an export whose model cannot load
    (tmp_path / "pope").mkdir()
    db = tmp_path / "wh.duckdb"
    overrides = [f"work_dir={tmp_path / 'work'}", f"eval.data_dirs={{pope: {tmp_path / 'pope'}}}",
                 f"detector.model={tmp_path / 'no-detector.pt'}"]
    rows = evaluate(str(model), overrides=overrides, benchmarks=["pope"], run_id="bad-model", warehouse=str(db))
    assert {r["task"]: r["status"] for r in rows} == {"pope": "failed"}
    assert _q(db, "SELECT status, reason FROM eval_runs") == [("failed", "1 of 1 benchmarks failed: pope")]
    fault_ledger.record("evaluation of a model that fails to load", True)

    def refuse(*args, **kwargs):
        raise TimeoutError("the warehouse is busy")

    monkeypatch.setattr(warehouse_eval, "write_task_result", refuse)  # the flow's write of the result fails
    with pytest.raises(TimeoutError):
        evaluate(str(model), overrides=overrides, benchmarks=["pope"], run_id="write-fails", warehouse=str(db))
    [(status, reason)] = _q(db, "SELECT status, reason FROM eval_runs WHERE run_id = 'write-fails'")
    assert status == "failed" and reason == "TimeoutError: the warehouse is busy"
    assert _q(db, "SELECT run_id, status FROM eval_tasks") == [("write-fails", "failed")]
    fault_ledger.record("evaluation whose warehouse write fails", True)
