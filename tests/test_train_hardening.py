"""Training hardening: resume under a content key, checkpoint retention and fallback, atomic export,
the stage lock, and warehouse writes that survive a busy warehouse and record failures."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import _Toy, _toy_collate, _ToyData

from mgllava.config import ConfigError, StageConfig
from mgllava.train.engine import ResumeRefused, check_content_key, run_stage

KEY = {"key": "k1", "parts": {"model": "m", "stage recipe": "r", "seed": "s", "corpus": "c", "boxes": "b",
                              "upstream weights": "u"}}


def _toy_run(checkpoints, stage=None, **kwargs):
    stage = stage or StageConfig(global_batch=4, micro_batch=2, lr=0.05, max_steps=6, save_every=1)
    torch.manual_seed(0)
    return run_stage(_Toy(), _ToyData(), _toy_collate, stage, "pretrain", checkpoints, seed=0, progress=False,
                     **kwargs)


def test_resume_under_another_content_key_is_refused_naming_what_changed(tmp_path, fault_ledger):
    check_content_key(tmp_path, KEY, "pretrain")  # no checkpoints yet: the key is recorded
    first = _toy_run(tmp_path)
    assert first.steps == 6
    changed = {"key": "k2", "parts": {**KEY["parts"], "stage recipe": "r2", "corpus": "c2"}}
    with pytest.raises(ResumeRefused, match=r"other inputs \(stage recipe, corpus changed\).*--fresh") as info:
        check_content_key(tmp_path, changed, "pretrain")
    assert isinstance(info.value, ConfigError)
    fault_ledger.record("resume with a changed recipe and corpus", survived=True)
    check_content_key(tmp_path, KEY, "pretrain")
    again = _toy_run(tmp_path)  # same key, already complete: nothing to train, same result
    assert (again.resumed_from, again.steps, again.final_loss) == (6, 6, first.final_loss)
    (tmp_path / "content_key.json").unlink()  # checkpoints of an older version: no key, refused too
    with pytest.raises(ResumeRefused, match="carry no content key"):
        check_content_key(tmp_path, KEY, "pretrain")


def test_a_changed_recipe_is_refused_before_the_model_loads(tiny_config, monkeypatch):
    from mgllava.train import job
    from warehouse import db

    checkpoints = job.stage_dir(tiny_config, "pretrain") / "checkpoints"
    check_content_key(checkpoints, {"key": "old", "parts": {}}, "pretrain")
    (checkpoints / "step_1").mkdir()

    def never(*args, **kwargs):
        raise AssertionError("the stage went on to load its inputs")

    monkeypatch.setattr(job, "_train_stage", never)
    with pytest.raises(ResumeRefused, match="model, stage recipe, seed, corpus, boxes, upstream weights changed"):
        job.train(tiny_config, "pretrain", run_id="changed")
    with db.connect(read_only=True) as con:
        row = con.execute("SELECT status, reason FROM train_stages WHERE run_id = 'changed'").fetchone()
    assert row[0] == "failed" and row[1].startswith("ResumeRefused: ")


def test_train_key_parts_name_the_changed_input(tiny_config):
    from mgllava.lineage import train_key, train_key_parts

    before = train_key_parts(tiny_config, "pretrain")
    tiny_config.train.pretrain.lr *= 2
    after = train_key_parts(tiny_config, "pretrain")
    assert [name for name in before if before[name] != after[name]] == ["stage recipe"]
    assert set(before) == {"model", "stage recipe", "seed", "corpus", "boxes", "upstream weights"}
    assert len(train_key(tiny_config, "pretrain")) == 64


def test_only_the_newest_checkpoints_are_kept_and_an_unusable_one_is_passed_over(tmp_path, caplog, fault_ledger):
    full = _toy_run(tmp_path, keep_checkpoints=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_5", "step_6"]

    caplog.set_level(logging.WARNING, logger="mgllava.train.engine")
    model_file = tmp_path / "step_6" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # torn
    (tmp_path / "latest").write_text("")
    resumed = _toy_run(tmp_path, keep_checkpoints=2)
    assert resumed.resumed_from == 5 and resumed.steps == 6
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-6)
    assert "latest is empty" in caplog.text and "mp_rank_00_model_states.pt does not open" in caplog.text
    fault_ledger.record("torn newest checkpoint and empty latest tag", survived=True)

    caplog.clear()
    (tmp_path / "latest").write_text("step_99")
    for marker in tmp_path.glob("step_*/complete"):
        marker.unlink()  # as if every save was interrupted
    restarted = _toy_run(tmp_path, keep_checkpoints=2)
    assert restarted.resumed_from == 0 and restarted.final_loss == pytest.approx(full.final_loss, abs=1e-6)
    assert "names step_99, which does not exist" in caplog.text and "not marked complete" in caplog.text
    fault_ledger.record("dangling latest tag, no complete checkpoint", survived=True)


def test_a_failed_re_export_leaves_the_previous_export_whole(tiny_config, tmp_path, monkeypatch):
    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor

    model = MGLLaVAForConditionalGeneration.from_config(tiny_config.model)
    processor = MGLLaVAProcessor.from_config(tiny_config.model)
    target = model.export(tmp_path / "out" / "export", processor)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with torch.no_grad():
        next(model.llm.parameters()).add_(1.0)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(processor, "save_pretrained", disk_full)  # after the weights are written
    with pytest.raises(OSError, match="No space left"):
        model.export(target, processor)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before  # the old export, untouched: not its LLM rewritten in place
    monkeypatch.undo()
    (target / "stale.txt").write_text("from an older export")
    model.export(target, processor)
    assert not (target / "stale.txt").exists()
    assert [p.name for p in target.parent.iterdir()] == ["export"]  # no staging or old copies left


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from mgllava.train.job import stage_lock
with stage_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_of_a_stage_stops_naming_the_directory_and_holder(tiny_config, fault_ledger, monkeypatch):
    from mgllava.train.job import LOCK_ENV, StageBusy, stage_dir, stage_lock, train

    out = stage_dir(tiny_config, "pretrain").resolve()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageBusy, match=f"{out} is in use by another run \\(pid {holder.pid}\\)"):
            train(tiny_config, "pretrain", run_id="second")
        fault_ledger.record("second concurrent run of a stage", survived=True)
        monkeypatch.setenv(LOCK_ENV, str(out.parent / ".pretrain.lock"))  # a rank of the holder's own job
        with stage_lock(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.delenv(LOCK_ENV)
    with stage_lock(out):  # released when its holder died
        pass


WAREHOUSE_HOLDER = """
import sys, time
from pathlib import Path
import duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
spool = Path(sys.argv[2])
deadline = time.monotonic() + 120
while not spool.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(3)  # several steps' writes find the warehouse busy
con.close()
"""


@pytest.mark.slow
def test_training_survives_a_busy_warehouse_and_loads_every_row_once(tiny_config, caplog, fault_ledger):
    from mgllava.train.job import train, warehouse_spool
    from warehouse import db

    stage = tiny_config.train.pretrain
    stage.micro_batch, stage.global_batch, stage.max_steps, stage.save_every = 2, 4, 4, 100
    db.connect().close()  # the warehouse exists, with its tables
    spool = warehouse_spool(tiny_config, "pretrain")
    holder = subprocess.Popen([sys.executable, "-c", WAREHOUSE_HOLDER, str(db.default_path()), str(spool)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    caplog.set_level(logging.WARNING, logger="warehouse.training")
    started = time.monotonic()
    summary = train(tiny_config, "pretrain", run_id="busy", progress=False)
    assert holder.wait(timeout=60) == 0
    assert summary["steps"] == 4
    assert "warehouse write(s) wait in" in caplog.text  # it was busy, and the run went on
    with db.connect(read_only=True) as con:
        steps = con.execute("SELECT step FROM train_steps WHERE run_id = 'busy' ORDER BY step").fetchall()
        status = con.execute("SELECT status, steps FROM train_stages WHERE run_id = 'busy'").fetchall()
    assert steps == [(1,), (2,), (3,), (4,)] and status == [("completed", 4)]
    assert not spool.exists()
    fault_ledger.record("warehouse held by another process during training", survived=True,
                        rows_lost=4 - len(steps))
    assert time.monotonic() - started < 120


def test_a_failed_stage_is_marked_failed_with_the_reason(tiny_config, tmp_path, fault_ledger):
    from mgllava.train.job import train
    from warehouse import db

    broken = tmp_path / "broken.json"
    broken.write_text("[{not json")
    tiny_config.data.pretrain_json = str(broken)
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        train(tiny_config, "pretrain", run_id="broken")
    with db.connect(read_only=True) as con:
        row = con.execute("SELECT status, reason FROM train_stages WHERE run_id = 'broken'").fetchone()
    assert row[0] == "failed" and row[1].startswith("ValueError: ") and "broken.json" in row[1]
    fault_ledger.record("stage that fails on a broken corpus", survived=row[0] == "failed")


def test_spooled_writes_load_in_order_once(tmp_path):
    from types import SimpleNamespace

    from warehouse import db
    from warehouse import training as warehouse

    spool = tmp_path / "pending.jsonl"
    rows = [SimpleNamespace(step=s, loss=1.0 / s, lr=0.1, grad_norm=float("nan"), samples_per_s=1.0,
                            tokens_per_s=2.0, skipped=0) for s in (1, 2, 3)]
    locker = subprocess.Popen([sys.executable, "-c", WAREHOUSE_HOLDER, str(db.default_path()), str(tmp_path / "go")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "holding"
        assert warehouse.insert_train_steps("r", "pretrain", rows[:2], spool) is False
        assert warehouse.insert_train_steps("r", "pretrain", rows[1:], spool) is False
    finally:
        locker.kill()
        locker.wait()
    with spool.open("a") as f:
        f.write('{"op": "steps", "rows": [["r", "pretr')  # a write torn by a kill
    assert warehouse.load_spool(spool) and not spool.exists()
    with db.connect(read_only=True) as con:
        got = con.execute("SELECT step, loss FROM train_steps WHERE run_id = 'r' ORDER BY step").fetchall()
    assert got == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_a_terminated_stage_is_marked_failed_with_the_signal(tiny_config, monkeypatch, fault_ledger):
    from mgllava.train import job
    from mgllava.train.cli import fail_on_sigterm
    from warehouse import db

    def terminated(boxes_dir):  # SIGTERM arrives while the stage loads its inputs
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(job, "load_boxes", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        fail_on_sigterm()
        with pytest.raises(SystemExit, match="terminated by signal SIGTERM"):
            job.train(tiny_config, "pretrain", run_id="terminated")
    finally:
        signal.signal(signal.SIGTERM, previous)
    with db.connect(read_only=True) as con:
        row = con.execute("SELECT status, reason FROM train_stages WHERE run_id = 'terminated'").fetchone()
    assert row == ("failed", "SystemExit: terminated by signal SIGTERM")
    fault_ledger.record("SIGTERM during a stage", survived=row[0] == "failed")


def test_an_interrupted_launcher_stops_its_job(tmp_path):
    from mgllava.train.launch import run_job

    script = tmp_path / "job.py"
    script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n")
    pids = []

    def interrupt(line):
        pids.append(int(line))
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_job([sys.executable, str(script)], interrupt)
    assert time.monotonic() - started < 20  # not waiting for the job's minute
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def test_a_job_does_not_inherit_this_process_s_distributed_world(tmp_path, monkeypatch):
    from mgllava.train.launch import run_job

    monkeypatch.setenv("RANK", "0")  # as after an in-process stage: its rendezvous port is taken
    monkeypatch.setenv("MASTER_PORT", "29999")
    script = tmp_path / "world.py"
    script.write_text("import os\nprint(os.environ.get('RANK', 'unset'), os.environ.get('MASTER_PORT', 'unset'))\n")
    lines = []
    run_job([sys.executable, str(script)], lines.append)
    assert lines == ["unset unset"]


def test_resumable_says_whether_the_checkpoints_are_this_input_s(tiny_config):
    """The full-train flow starts a stage over when its checkpoints were made from other inputs."""
    from mgllava.train import job

    assert job.resumable(tiny_config, "pretrain")  # no checkpoints yet
    checkpoints = job.stage_dir(tiny_config, "pretrain") / "checkpoints"
    (checkpoints / "step_1").mkdir(parents=True)
    assert job.resumable(tiny_config, "pretrain")  # the key was recorded by the first call
    tiny_config.train.pretrain.lr *= 2
    assert not job.resumable(tiny_config, "pretrain")


def test_the_data_section_s_image_limits_reach_training(tiny_config):
    """detector.max_image_pixels is also the training loader's limit: images over it are skipped as too_large."""
    from mgllava.train.job import train

    stage = tiny_config.train.pretrain
    stage.micro_batch, stage.global_batch, stage.max_steps, stage.save_every = 2, 2, 1, 100
    tiny_config.detector.max_image_pixels = 16 * 16  # smaller than every world image
    tiny_config.data.cache_image_features = False
    summary = train(tiny_config, "pretrain", run_id="small-limit", progress=False)
    assert summary["skipped_samples"] == {"too_large": 2}
