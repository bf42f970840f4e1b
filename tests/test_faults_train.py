"""Fault injection on training: kill -9 a stage mid-step, mid-checkpoint and mid-warehouse-write, restart it,
and check it ends where an uninterrupted run ends (same steps, same losses) with every step row once.

The kills are real SIGKILLs of ``python -m mgllava.train`` (the launcher's entry point), made by the
process itself at a named point (``MGLLAVA_FAULT``, see :func:`mgllava.train.engine.fault_point`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mgllava.train.engine import FAULT_ENV

STEPS = 6


def _run_stage(config_file, run_id: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    command = [sys.executable, "-m", "mgllava.train", "--config", str(config_file), "--stage", "pretrain",
               "--run-id", run_id, "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _steps(run_id: str) -> list[tuple[int, float]]:
    from warehouse import db

    with db.connect(read_only=True) as con:
        return con.execute("SELECT step, loss FROM train_steps WHERE run_id = ? ORDER BY step", [run_id]).fetchall()


def _config(tiny_config, tmp_path, name: str):
    config = tiny_config.model_copy(deep=True)
    config.train.output_dir = str(tmp_path / name)
    corpus = tmp_path / "pretrain8.json"  # 8 samples, 2 steps an epoch: the point is the bookkeeping
    corpus.write_text(json.dumps(json.loads(Path(config.data.pretrain_json).read_text())[:8]))
    config.data.pretrain_json = str(corpus)
    stage = config.train.pretrain
    stage.micro_batch, stage.global_batch, stage.max_steps, stage.save_every, stage.epochs = 2, 4, STEPS, 1, 10
    return config.save(tmp_path / f"{name}.yaml")


@pytest.mark.slow
def test_a_killed_stage_restarts_to_the_same_steps_and_losses(tiny_config, tmp_path, fault_ledger):
    reference = _run_stage(_config(tiny_config, tmp_path, "reference"), "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _steps("reference")
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))

    config_file = _config(tiny_config, tmp_path, "killed")
    # each restart resumes from the last checkpoint the killed run completed
    runs = (("step:3", None, None), ("checkpoint:4", 2, None), ("warehouse:5", 3, "step_4: not marked complete"),
            (None, 4, None))
    for fault, resumed_at, warning in runs:
        run = _run_stage(config_file, "killed", fault)
        if resumed_at:
            assert f"at step {resumed_at}/{STEPS}" in run.stderr, run.stderr[-3000:]
        if warning:
            assert warning in run.stderr
        if fault:
            assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "killed" / "pretrain" / "result.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"] == 4

    got = _steps("killed")
    assert [step for step, _ in got] == [step for step, _ in expected]  # each step's row, once
    for (_, loss), (_, want) in zip(got, expected):
        assert loss == pytest.approx(want, abs=1e-6)
    assert summary["final_loss"] == pytest.approx(expected[-1][1], abs=1e-6)
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "pretrain" / "checkpoints").glob("step_*"))
    assert checkpoints == [f"step_{STEPS - 1}", f"step_{STEPS}"]
    for fault, _, _ in runs[:-1]:
        fault_ledger.record(f"training killed at {fault}", survived=True)
