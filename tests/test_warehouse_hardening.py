"""The warehouse under hostile SQL, a busy file, big writes and failed runs (issue 18).

- ``mgllava results --sql`` runs exactly one read-only statement, with file access off except
  the box tables' directories, extensions off and the configuration locked;
- a reader that cannot get the file prints one line naming it and exits non-zero;
- a 20k-prediction write holds the lock briefly (one Arrow bulk insert);
- a run that fails (an error, an interrupt, a benchmark that failed) ends ``failed`` with a
  reason; scores left standing by a failed or skipped re-evaluation are marked stale;
- an older warehouse gains the new columns.
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import duckdb
import pytest
from test_warehouse import ROWS, write_box_table, write_manifest

from mgllava.cli import main as cli
from warehouse import db
from warehouse import eval as wh


def completed(task: str, n: int = 3, value: float = 0.5) -> dict:
    predictions = [dict(doc_id=i, question=f"q{i}", prompt="p", target="yes", prediction="no",
                        score=None if i == 0 else float(i % 2), n_boxes=2, box_origin="table") for i in range(n)]
    return dict(name=task, task=f"{task}_mgllava", status="completed", reason="", data_dir="/d", n=n,
                metrics={"acc": value, "f1": value}, predictions=predictions, seconds=2.0, generate_seconds=1.0,
                box_origins={"table": n})


def outcome(task: str, status: str, reason: str) -> dict:
    return dict(name=task, task=f"{task}_mgllava", status=status, reason=reason, n=0, metrics={}, predictions=[])


@pytest.fixture
def warehouse(tmp_path):
    """A warehouse with scores, and a registered box table whose views read Parquet from ``boxes/``."""
    box = tmp_path / "box table"
    write_box_table(box, ROWS, [("e.png", "empty")])
    write_manifest(box)
    path = tmp_path / "wh.duckdb"
    db.register_box_table(box, path)
    wh.write_task_result("r1", "/ckpt", completed("pope"), db_path=path)
    (tmp_path / "secret.txt").write_text("TOPSECRET\n")
    return SimpleNamespace(path=path, box=box, tmp=tmp_path, secret=tmp_path / "secret.txt")


def results(w, capsys, *args) -> tuple[int, str, str]:
    code = cli(["results", "--warehouse", str(w.path), *args])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- 1. results --sql is read-only

HOSTILE = {
    "COPY TO a file": "COPY (SELECT * FROM scores) TO '{tmp}/out.csv'",
    "EXPLAIN ANALYZE COPY": "EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/out.csv'",
    "read_csv outside": "SELECT * FROM read_csv('{secret}')",
    "read_text outside": "SELECT content FROM read_text('{secret}')",
    "read_blob outside": "SELECT content FROM read_blob('{secret}')",
    "read_text up from a box dir": "SELECT content FROM read_text('{box}/../secret.txt')",
    "glob": "SELECT * FROM glob('{tmp}/*')",
    "remote file": "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
    "ATTACH": "ATTACH '{tmp}/new.duckdb' AS n",
    "ATTACH + CREATE": "ATTACH '{tmp}/new.duckdb' AS n; CREATE TABLE n.t AS SELECT 42 AS x",
    "two statements": "SELECT 1; SELECT 2",
    "DELETE": "DELETE FROM scores",
    "CREATE": "CREATE TABLE t AS SELECT 1",
    "SET external access on": "SET enable_external_access = true",
    "RESET lock": "RESET lock_configuration",
    "INSTALL": "INSTALL httpfs",
    "LOAD": "LOAD httpfs",
    "PRAGMA": "PRAGMA enable_profiling",
    "CALL": "CALL checkpoint()",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_sql_is_refused_and_has_no_effect(warehouse, capsys, fault_ledger, name):
    w = warehouse
    sql = HOSTILE[name].format(tmp=w.tmp, secret=w.secret, box=w.box)
    code, out, err = results(w, capsys, "--sql", sql)
    survived = (code == 2 and err.startswith("mgllava results: refused: ") and err.count("\n") == 1
                and "TOPSECRET" not in out + err and not (w.tmp / "out.csv").exists()
                and not (w.tmp / "new.duckdb").exists())
    fault_ledger.record(f"results --sql: {name}", survived)
    assert code == 2, (out, err)
    assert err.startswith("mgllava results: refused: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "TOPSECRET" not in out + err
    assert not (w.tmp / "out.csv").exists() and not (w.tmp / "new.duckdb").exists()
    # nothing changed: same tables, same rows
    with duckdb.connect(str(w.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM scores").fetchone() == (2,)
        assert "t" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}


def test_read_only_queries_and_box_views_still_answer(warehouse, capsys):
    w = warehouse
    for sql, expected in [
        ("SELECT metric, value FROM scores ORDER BY 1", "acc"),
        ("WITH s AS (SELECT * FROM scores) SELECT count(*) AS n_scores FROM s", "n_scores"),
        ("DESCRIBE scores", "stale"),
        ("SHOW TABLES", "predictions"),
        ("EXPLAIN SELECT * FROM scores", "physical_plan"),
        ("SELECT label, count(*) AS n FROM box_detections GROUP BY 1 ORDER BY 1", "circle"),
        ("SELECT count(*) AS n_empty FROM box_images WHERE n_boxes = 0", "n_empty"),
        (f"SELECT count(*) AS direct FROM read_parquet('{w.box}/boxes/*.parquet')", "direct"),
    ]:
        code, out, err = results(w, capsys, "--sql", sql)
        assert code == 0 and expected in out, (sql, out, err)
    code, out, _ = results(w, capsys)
    assert code == 0 and "pope" in out and "(2 rows)" in out
    # the locked configuration went with the connection: this process can still write
    wh.write_task_result("r2", "/ckpt", completed("mmbench"), db_path=w.path)
    assert wh.read_only_query("SELECT count(*) FROM scores", db_path=w.path)[1] == [(4,)]


def test_a_query_error_is_one_line(warehouse, capsys):
    code, _, err = results(warehouse, capsys, "--sql", "SELECT nope FROM scores")
    assert code == 1 and err.count("\n") == 1 and "nope" in err
    # with file access off a file name is no table (no replacement scan reads it)
    code, out, err = results(warehouse, capsys, "--sql", f"SELECT * FROM '{warehouse.secret}'")
    assert code == 1 and err.count("\n") == 1 and "TOPSECRET" not in out + err


# ----------------------------------------------------------------------------- 2. a busy warehouse


def test_busy_warehouse_is_one_line_not_a_traceback(warehouse, capsys, fault_ledger):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(warehouse.path)!r}); "
         "print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in ([], ["--sql", "SELECT 1"]):
            code, out, err = results(warehouse, capsys, "--wait", "0.3", *args)
            fault_ledger.record("results while another process writes", code == 1 and err.count("\n") == 1)
            assert code == 1 and out == ""
            assert err.count("\n") == 1 and "Traceback" not in err
            assert str(warehouse.path) in err and f"process {holder.pid}" in err and "try again" in err
    finally:
        holder.kill()
        holder.wait()
    assert results(warehouse, capsys)[0] == 0  # free again


# ----------------------------------------------------------------------------- 3. bulk writes


def test_20k_predictions_are_one_short_bulk_write(tmp_path):
    path = tmp_path / "wh.duckdb"
    wh.write_task_result("r0", "/ckpt", completed("mme", n=2), db_path=path)  # the schema exists
    big = completed("pope", n=20_000)
    t0 = time.perf_counter()
    wh.write_task_result("r1", "/ckpt", big, db_path=path)
    seconds = time.perf_counter() - t0
    assert seconds < 3.0, f"a 20k-prediction write took {seconds:.1f} s"  # row by row it took ~9 s
    q = wh.read_only_query(
        "SELECT count(*), count(DISTINCT doc_id), count(score), count(*) FILTER (correct), sum(n_boxes), "
        "min(question), max(run_id) FROM predictions WHERE task = 'pope'", db_path=path)[1]
    assert q == [(20_000, 20_000, 19_999, 10_000, 40_000, "q0", "r1")]


# ----------------------------------------------------------------------------- 4. status that never lies


def _config():
    from mgllava.config import load_config

    return load_config(preset="tiny")


def _run(path, run_id, tasks):
    wh.record_run_start(run_id, "/ckpt", _config(), tasks, None, None, db_path=path)


def _q(path, sql, params=None):
    return wh.read_only_query(sql, params, db_path=path)[1]


def test_failed_or_skipped_reevaluation_marks_the_old_scores_stale(tmp_path, capsys):
    path = tmp_path / "wh.duckdb"
    wh.write_task_result("r1", "/ckpt", completed("pope"), db_path=path)
    wh.write_task_result("r1", "/ckpt", completed("mmbench"), db_path=path)
    stale = "SELECT task, status, stale, score_run FROM ({}) GROUP BY ALL ORDER BY 1".format(
        wh.SCORE_TABLE_SQL.replace("?", "NULL"))
    assert _q(path, stale) == [("mmbench", "completed", False, "r1"), ("pope", "completed", False, "r1")]
    wh.write_task_result("r2", "/ckpt", outcome("pope", "failed", "boom"), db_path=path)
    wh.write_task_result("r2", "/ckpt", outcome("mmbench", "skipped", "no data"), db_path=path)
    assert _q(path, stale) == [("mmbench", "skipped", True, "r1"), ("pope", "failed", True, "r1")]
    assert _q(path, "SELECT count(*) FILTER (stale) FROM scores") == [(4,)]
    assert cli(["results", "--warehouse", str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "stale" in table[0] and "score_run" in table[0] and all("True" in line for line in table[2:6])
    wh.write_task_result("r3", "/ckpt", completed("pope", value=0.9), db_path=path)  # a new score is not stale
    assert _q(path, stale)[1] == ("pope", "completed", False, "r3")


@pytest.mark.parametrize("abort", [RuntimeError("model failed to load"), KeyboardInterrupt()])
def test_a_run_that_ends_early_is_failed_with_a_reason(tmp_path, abort):
    path = tmp_path / "wh.duckdb"
    wh.write_task_result("r0", "/ckpt", completed("mmbench"), db_path=path)  # an earlier score
    _run(path, "r1", ["pope", "mmbench"])
    assert _q(path, "SELECT status FROM eval_runs") == [("running",)]
    with pytest.raises(type(abort)), wh.failure_recorded("r1", db_path=path):
        wh.write_task_result("r1", "/ckpt", completed("pope"), db_path=path)
        raise abort
    [(status, reason, n_completed, n_failed, finished)] = _q(
        path, "SELECT status, reason, n_completed, n_failed, finished_at IS NOT NULL FROM eval_runs")
    assert (status, n_completed, n_failed, finished) == ("failed", 1, 1, True)
    assert reason.startswith(type(abort).__name__)
    # mmbench never ran in r1: its outcome says so, and the r0 score left standing is stale
    assert _q(path, "SELECT status, reason LIKE 'the evaluation run ended before it%' FROM eval_tasks "
                    "WHERE task = 'mmbench'") == [("failed", True)]
    assert _q(path, "SELECT task, bool_and(stale), any_value(run_id) FROM scores GROUP BY 1 ORDER BY 1") == [
        ("mmbench", True, "r0"), ("pope", False, "r1")]


def test_run_end_names_the_failed_benchmarks(tmp_path):
    path = tmp_path / "wh.duckdb"
    _run(path, "r1", ["pope", "mme"])
    results = [completed("pope"), outcome("mme", "failed", "boom")]
    for result in results:
        wh.write_task_result("r1", "/ckpt", result, db_path=path)
    wh.record_run_end("r1", results, db_path=path)
    assert _q(path, "SELECT status, reason, n_completed, n_failed FROM eval_runs") == [
        ("failed", "1 of 2 benchmarks failed: mme", 1, 1)]


def test_a_run_whose_process_died_is_failed_by_the_next(tmp_path):
    path = tmp_path / "wh.duckdb"
    child = subprocess.run(
        [sys.executable, "-c", "import sys, warehouse.eval as wh; from mgllava.config import load_config; "
         "wh.record_run_start('dead', '/ckpt', load_config(preset='tiny'), ['pope'], None, None, db_path=sys.argv[1])",
         str(path)], check=True)
    assert child.returncode == 0
    _run(path, "alive", ["pope"])  # this process is alive: its run stays running
    _run(path, "next", ["pope"])
    assert dict(_q(path, "SELECT run_id, status FROM eval_runs")) == {
        "dead": "failed", "alive": "running", "next": "running"}
    assert "ended without finishing" in _q(path, "SELECT reason FROM eval_runs WHERE run_id = 'dead'")[0][0]


# ----------------------------------------------------------------------------- an older warehouse


def test_an_older_warehouse_gains_the_new_columns(tmp_path, capsys):
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # the schema as version 1 declared it, with a score
        for statement in db.TABLES:
            con.execute(statement)
        con.execute("INSERT INTO schema_info VALUES ('warehouse_schema_version', '1')")
        con.execute("INSERT INTO eval_tasks (checkpoint, task, run_id, status) VALUES ('/ckpt', 'pope', 'r0', "
                    "'completed')")
        con.execute("INSERT INTO scores VALUES ('r0', '/ckpt', 'pope', 'acc', 0.7, 10, NULL)")
    assert cli(["results", "--warehouse", str(path)]) == 0  # a reader brings it up to date
    assert "0.7" in capsys.readouterr().out
    assert _q(path, "SELECT value, stale FROM scores") == [(0.7, False)]
    assert _q(path, "SELECT value FROM schema_info") == [(db.WAREHOUSE_SCHEMA_VERSION,)]
    wh.write_task_result("r1", "/ckpt", outcome("pope", "failed", "boom"), db_path=path)
    assert _q(path, "SELECT stale FROM scores") == [(True,)]
