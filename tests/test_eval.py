"""Evaluation: the lmms-eval entry point, local tasks, the flow into DuckDB, results SQL, chat."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json

import duckdb
import pytest
from conftest import tiny_overrides

from mgllava.config import load_config


def cli(argv: list[str]) -> int:
    """Run ``mgllava <argv>`` through this module's ``register_cli`` on a fresh parser."""
    from mgllava.eval.cli import register_cli

    parser = argparse.ArgumentParser(prog="mgllava")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ----------------------------------------------------------------------------- entry point and tasks


@pytest.mark.slow  # importing lmms_eval.models takes ~15 s
def test_entry_point_is_discovered_by_lmms_eval():
    from lmms_eval.models import get_model

    from mgllava.eval.lmms_model import MGLLaVALmms

    assert get_model("mgllava") is MGLLaVALmms


def test_task_plans_and_files(tiny_world, tiny_zoo, tmp_path, monkeypatch):
    import yaml

    from mgllava.eval.tasks import BENCHMARKS, plan_tasks, stock_tasks_dir, write_task_files

    assert len(BENCHMARKS) == 13
    for bench in BENCHMARKS.values():
        assert (stock_tasks_dir() / bench.stock_yaml).is_file(), bench.stock_yaml
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    config = load_config(overrides=tiny_overrides(tiny_world, tiny_zoo, tmp_path / "w") + [
        f"eval.data_dirs.vqav2={tmp_path / 'vqa'}",
        f"eval.data_dirs.mmvet={tmp_path / 'mmvet'}",
        "eval.judge_api_key_env=JUDGE_KEY",
    ])
    plans = {p.name: p for p in plan_tasks(config, list(BENCHMARKS))}
    assert {n for n, p in plans.items() if p.status == "ready"} == {"pope", "mmbench", "textvqa", "gqa", "vqav2"}
    assert plans["pope"].data_dir == str(tiny_world / "bench" / "pope")
    assert plans["vqav2"].data_dir == str(tmp_path / "vqa")
    assert "eval.data_dirs.mme" in plans["mme"].reason
    assert "$JUDGE_KEY" in plans["mmvet"].reason and "$JUDGE_KEY" in plans["mathvista"].reason
    monkeypatch.setenv("JUDGE_KEY", "k")
    assert {p.name: p.status for p in plan_tasks(config, ["mmvet", "mathvista"])} == {
        "mmvet": "ready", "mathvista": "skipped"}  # mathvista still lacks data
    with pytest.raises(ValueError, match="unknown benchmark"):
        plan_tasks(config, ["nope"])

    folder = write_task_files(list(plans.values()), tmp_path / "tasks")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{n}_mgllava.yaml" for n in ("pope", "mmbench", "textvqa", "gqa", "vqav2"))
    gqa = yaml.safe_load((folder / "gqa_mgllava.yaml").read_text())
    assert gqa["include"] == str(stock_tasks_dir() / "gqa/gqa.yaml")
    assert gqa["dataset_path"] == str(tiny_world / "bench" / "gqa")
    assert gqa["dataset_kwargs"] == {"load_from_disk": True} and gqa["process_docs"] is None
    assert gqa["task"] == "gqa_mgllava"


# ----------------------------------------------------------------------------- boxes


def test_box_source_table_detector_and_cache(tiny_world, tmp_path, boxy):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from detector import schema
    from detector.model import DetectorSettings
    from mgllava.eval.boxes import BoxSource, ImageRef

    raw_ds = datasets.load_from_disk(str(tiny_world / "bench" / "pope"))["test"].cast_column(
        "image", datasets.Image(decode=False))
    decoded = datasets.load_from_disk(str(tiny_world / "bench" / "pope"))["test"]
    refs = [ImageRef(decoded[i]["image"], raw_ds[i]["image"]["bytes"], (decoded[i]["image_source"],))
            for i in range(3)]
    # a box table with a row for image 0 (joined on its sha256) and for image 1 (joined on its key)
    (tmp_path / "table" / "boxes").mkdir(parents=True)
    box = [dict(x1=1.0, y1=2.0, x2=30.0, y2=40.0, score=0.9, label="circle")]
    rows = {f.name: [] for f in schema.BOXES_FIELDS}
    for key, sha in (("x/0.png", refs[0].content_hash()), (refs[1].keys[0], "f" * 64)):
        for c, v in (("image_key", key), ("width", 1), ("height", 1), ("sha256", sha), ("boxes", box),
                     ("detector", "YOLO:t"), ("weights_sha256", "ab"), ("params", "{}"),
                     ("detected_at", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)), ("shard", 0)):
            rows[c].append(v)
    pq.write_table(pa.Table.from_pydict(rows, schema=schema.boxes_schema("fp", 0)),
                   tmp_path / "table" / "boxes" / "part-00000.parquet")

    with pytest.raises(LookupError, match="no row in the box table"):
        BoxSource(tmp_path / "table").boxes(refs)
    got = BoxSource(tmp_path / "table", allow_missing=True).boxes(refs)
    assert [o for _, o in got] == ["table", "table", "none"]
    assert got[0][0].labels == ["circle"] and got[0][0].xyxy.tolist() == [[1.0, 2.0, 30.0, 40.0]]

    settings = DetectorSettings(model=boxy, imgsz=160, max_det=10, device="cpu")
    first = BoxSource(tmp_path / "table", settings, tmp_path / "cache")
    assert [o for _, o in first.boxes(refs)] == ["table", "table", "detector"]
    second = BoxSource(None, settings, tmp_path / "cache")
    again = second.boxes(refs[2:])
    assert again[0][1] == "cache" and len(again[0][0]) > 0
    assert again[0][0].xyxy.tolist() == first.boxes(refs[2:])[0][0].xyxy.tolist()
    # other detector parameters: another cache, so the boxes are computed again
    other = BoxSource(None, DetectorSettings(model=boxy, imgsz=160, max_det=3, device="cpu"), tmp_path / "cache")
    assert other.boxes(refs[2:])[0][1] == "detector"


# ----------------------------------------------------------------------------- warehouse and results


def _result(task, status="completed", n=3, value=0.5, reason=""):
    preds = [dict(doc_id=i, question=f"q{i}", prompt="p", target="yes", prediction="no", score=float(i % 2),
                  n_boxes=2, box_origin="table") for i in range(n)] if status == "completed" else []
    return dict(name=task, task=f"{task}_mgllava", status=status, reason=reason, data_dir="/d", n=n,
                metrics={"acc": value, "f1": value} if status == "completed" else {}, predictions=preds,
                seconds=2.0, generate_seconds=1.0, box_origins={"table": n})


def test_results_replace_and_read_only(tmp_path, capsys):
    from warehouse.eval import read_only_query, score_table, write_task_result

    db = tmp_path / "wh.duckdb"
    write_task_result("r1", "/ckpt", _result("pope"), db_path=db)
    write_task_result("r1", "/ckpt", _result("mmbench"), db_path=db)
    write_task_result("r2", "/ckpt", _result("pope", n=2, value=0.9), db_path=db)  # re-evaluation replaces
    _, rows = read_only_query("SELECT task, count(*) FROM predictions GROUP BY 1 ORDER BY 1", db_path=db)
    assert rows == [("mmbench", 3), ("pope", 2)]
    _, rows = read_only_query("SELECT task, metric, value, run_id FROM scores ORDER BY 1, 2", db_path=db)
    assert rows == [("mmbench", "acc", 0.5, "r1"), ("mmbench", "f1", 0.5, "r1"),
                    ("pope", "acc", 0.9, "r2"), ("pope", "f1", 0.9, "r2")]
    # a failed re-evaluation is recorded, and keeps the scores of the last completed one
    write_task_result("r3", "/ckpt", _result("pope", "failed", reason="boom"), db_path=db)
    cols, rows = score_table(task="pope", db_path=db)
    assert {r[cols.index("status")] for r in rows} == {"failed"} and len(rows) == 2
    _, rows = read_only_query("SELECT count(*) FROM eval_tasks", db_path=db)
    assert rows == [(2,)]

    with pytest.raises(duckdb.Error):
        read_only_query("DELETE FROM scores", db_path=db)
    assert cli(["results", "--warehouse", str(db), "--sql", "INSERT INTO scores VALUES ('x','x','x','x',1,1,NULL)"]) == 2  # refused (issue 18)
    assert "read-only" in capsys.readouterr().err
    assert cli(["results", "--warehouse", str(db)]) == 0
    out = capsys.readouterr().out
    assert "mmbench" in out and "boom" in out and "(4 rows)" in out
    assert cli(["results", "--warehouse", str(db), "--sql", "SELECT count(*) AS n FROM predictions"]) == 0
    assert "5" in capsys.readouterr().out.splitlines()[2]


# ----------------------------------------------------------------------------- the flow, end to end



@pytest.mark.slow
def test_evaluate_flow_end_to_end(prefect_server, exported, boxy, tiny_world, tiny_zoo, tmp_path):
    from flows.evaluate import run_evaluate
    from warehouse.eval import read_only_query

    (tmp_path / "broken").mkdir()  # exists, but is not a saved dataset
    overrides = tiny_overrides(tiny_world, tiny_zoo, tmp_path / "w") + [
        f"detector.model={boxy}", "detector.imgsz=160", "eval.max_new_tokens=3", "eval.batch_size=8",
        f"eval.data_dirs.textvqa={tmp_path / 'broken'}", "data.boxes_dir=" + str(tmp_path / "no-table"),
    ]
    db = str(tmp_path / "wh.duckdb")
    rows = run_evaluate(exported, max_workers=2, overrides=overrides, warehouse=db,
                        benchmarks=["pope", "mmbench", "textvqa", "mme", "mmvet"])
    status = {r["task"]: r["status"] for r in rows}
    assert status == {"pope": "completed", "mmbench": "completed", "textvqa": "failed", "mme": "skipped",
                      "mmvet": "skipped"}

    def q(sql):
        return read_only_query(sql, db_path=db)[1]

    assert q("SELECT task, count(*) FROM predictions GROUP BY 1 ORDER BY 1") == [("mmbench", 7), ("pope", 12)]
    assert sorted(m for (m,) in q("SELECT metric FROM scores WHERE task = 'pope'")) == [
        "pope_accuracy", "pope_f1_score", "pope_precision", "pope_recall", "pope_yes_ratio"]
    assert q("SELECT metric, n FROM scores WHERE task = 'mmbench'") == [("gpt_eval_score", 7)]
    reasons = dict(q("SELECT task, reason FROM eval_tasks WHERE status <> 'completed'"))
    assert "FileNotFoundError" in reasons["textvqa"] or "broken" in reasons["textvqa"]
    assert "eval.data_dirs.mme" in reasons["mme"] and "OPENAI_API_KEY" in reasons["mmvet"]
    # the boxes came from the detector (no box table) and reached the model
    # (POPE asks several questions per image: a repeated image's boxes come from the cache)
    assert {o for (o,) in q("SELECT DISTINCT box_origin FROM predictions")} <= {"detector", "cache"}
    assert q("SELECT count(*) > 0 FROM predictions WHERE box_origin = 'detector'") == [(True,)]
    assert q("SELECT min(n_boxes) > 0, count(score) FROM predictions WHERE task = 'pope'") == [(True, 12)]
    assert q("SELECT status, n_completed, n_failed, n_skipped FROM eval_runs") == [("failed", 2, 1, 2)]

    # same checkpoint and task again (fewer samples): rows replaced, not duplicated; boxes from the cache
    rows = run_evaluate(exported, max_workers=1, overrides=overrides + ["eval.limit=5"], warehouse=db,
                        benchmarks=["pope"])
    assert q("SELECT task, count(*) FROM predictions GROUP BY 1 ORDER BY 1") == [("mmbench", 7), ("pope", 5)]
    assert q("SELECT count(*), count(DISTINCT run_id), min(n) FROM scores WHERE task = 'pope'") == [(5, 1, 5)]
    assert q("SELECT DISTINCT box_origin FROM predictions WHERE task = 'pope'") == [("cache",)]
    assert q("SELECT count(*) FROM eval_tasks") == [(5,)] and q("SELECT count(*) FROM eval_runs") == [(2,)]


def test_evaluation_loads_the_llm_with_the_attention_kernel_chosen(exported, tiny_world, tiny_zoo, tmp_path):
    import torch

    from mgllava.eval.lmms_model import MGLLaVALmms, load_model
    from mgllava.eval.runner import model_kwargs

    default, _ = load_model(exported, "cpu")
    eager, _ = load_model(exported, "cpu", "eager")
    assert eager is not default and load_model(exported, "cpu", "eager")[0] is eager  # one copy per setting
    assert (default.llm.config._attn_implementation, eager.llm.config._attn_implementation) == ("sdpa", "eager")
    ids = torch.arange(1, 40)[None]  # (1, 39)
    with torch.no_grad():
        torch.testing.assert_close(eager.llm(ids).logits, default.llm(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="attention='flash'.*sdpa, eager, flash_attention_2"):
        MGLLaVALmms(pretrained=exported, detector="none", attention="flash")

    overrides = tiny_overrides(tiny_world, tiny_zoo, tmp_path)
    assert model_kwargs(load_config(overrides=overrides), exported)["attention"] is None
    assert model_kwargs(load_config(overrides=[*overrides, "eval.attention=eager"]), exported)["attention"] == "eager"
    with pytest.raises(ValueError, match="eval.attention"):
        load_config(overrides=[*overrides, "eval.attention=flash"])


# ----------------------------------------------------------------------------- chat


def test_chat_prints_detector_boxes_and_answers(exported, boxy, tiny_world, tmp_path, capsys, monkeypatch):
    image = sorted((tiny_world / "images" / "bench").glob("*.png"))[0]
    base = ["chat", "--model", exported, "--image", str(image), "--detector", boxy,
            "--set", "detector.imgsz=160", "--set", f"work_dir={tmp_path}", "--max-new-tokens", "3"]
    assert cli(base + ["Is there a circle?"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("from YOLO:boxy:") and int(out[0].split()[0]) > 0
    box_lines = [line for line in out[1:] if line.startswith("  ")]
    assert len(box_lines) == int(out[0].split()[0])
    assert out[-2] == "Q: Is there a circle?" and out[-1].startswith("A:")

    monkeypatch.setattr("sys.stdin", io.StringIO("What colour is it?\n\nexit\nnever asked\n"))
    assert cli(base + ["--interactive"]) == 0
    assert sum(line.startswith("A:") for line in capsys.readouterr().out.splitlines()) == 1

    assert cli(["chat", "--model", exported, "--image", str(image), "--detector", str(tmp_path / "no.pt"), "q"]) == 2
    assert "detector model not found" in capsys.readouterr().err


def test_sample_scores():
    from mgllava.eval.runner import sample_score

    assert sample_score(1) == 1.0 and sample_score({"score": 0.0, "prediction": "x"}) == 0.0
    assert sample_score({"pred": "B", "answer": "b"}) == 1.0
    assert sample_score({"prediction": "The answer is C.", "answer": "C", "A": "x", "B": "y", "C": "z"}) == 1.0
    assert sample_score({"prediction": "B", "answer": "C", "A": "x", "B": "y", "C": "z"}) == 0.0
    assert sample_score({"submission": json.dumps({})}) is None


def test_chat_streams_the_answer_without_the_first_word_pieces_space(tiny_zoo, capsys):
    import torch
    from transformers import AutoTokenizer

    from mgllava.eval.chat import answer_streamer

    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "llm")
    ids = tokenizer(" the red circle", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:1]).startswith(" ")  # the tokenizer's first piece carries the space
    streamer = answer_streamer(tokenizer)
    streamer.put(torch.tensor([tokenizer("USER: what? ASSISTANT:")["input_ids"]]))  # the prompt: not printed
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert capsys.readouterr().out == "the red circle\n"
