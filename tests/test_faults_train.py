"""Fault injection on training: kill -9 a stage mid-step, mid-checkpoint and mid-warehouse-write, restart it,
and check it ends where an uninterrupted run ends (same steps, same losses) with every step row once; and
scale-out: the same stage on 2 CPU ranks (gloo) under the ``deepspeed`` launcher, one rank killed mid-run.

The kills are real SIGKILLs of ``python -m mgllava.train`` (the launcher's entry point), made by the
process itself at a named point (``MGLLAVA_FAULT``, see :func:`mgllava.train.engine.fault_point`).
Every run here trains the same 4 steps of 2 samples (micro-batches of 1) from the same seed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides
from safetensors.torch import load_file

from mgllava.config import load_config
from mgllava.train.engine import FAULT_ENV
from mgllava.train.launch import job_env

pytestmark = pytest.mark.slow  # each case runs the stage in 2-4 fresh processes

STEPS = 4


def _config_file(tiny_world, tiny_zoo, root: Path, name: str) -> Path:
    corpus = root / "pretrain8.json"  # 8 samples: the point is the bookkeeping, not the learning
    corpus.write_text(json.dumps(json.loads((tiny_world / "pretrain.json").read_text())[:8]))
    config = load_config(overrides=[
        *tiny_overrides(tiny_world, tiny_zoo, root / "work"),
        f"data.pretrain_json={corpus}",
        f"train.output_dir={root / name}",
        "train.pretrain.micro_batch=1",
        "train.pretrain.global_batch=2",
        f"train.pretrain.max_steps={STEPS}",
        "train.pretrain.epochs=10",
        "train.pretrain.save_every=1",
        "train.pretrain.precision=fp32",  # bf16 autocast reduces gradients across ranks in bf16: not bit-equal
    ])
    return config.save(root / f"{name}.yaml")


def _run_stage(config_file: Path, run_id: str, fault: str | None = None, **env_vars) -> subprocess.CompletedProcess:
    env = {key: value for key, value in job_env().items() if key != FAULT_ENV}  # as a launched job's
    env.update({FAULT_ENV: fault} if fault else {}, **env_vars)
    command = [sys.executable, "-m", "mgllava.train", "--config", str(config_file), "--stage", "pretrain",
               "--run-id", run_id, "--quiet"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _warehouse_rows(sql: str, run_id: str, path: Path | None = None) -> list[tuple]:
    from warehouse import db

    with db.connect(path, read_only=True) as con:
        return con.execute(sql, [run_id]).fetchall()


def _steps(run_id: str, path: Path | None = None) -> list[tuple[int, float]]:
    return _warehouse_rows("SELECT step, loss FROM train_steps WHERE run_id = ? ORDER BY step", run_id, path)


@pytest.fixture(scope="module")
def reference(tiny_world, tiny_zoo, tmp_path_factory):
    """The uninterrupted one-rank run: its (step, loss) rows and its trained weights."""
    root = tmp_path_factory.mktemp("reference")
    run = _run_stage(_config_file(tiny_world, tiny_zoo, root, "out"), "reference", MGLLAVA_HOME=str(root))
    assert run.returncode == 0, run.stderr[-3000:]
    steps = _steps("reference", root / "warehouse.duckdb")
    assert [step for step, _ in steps] == list(range(1, STEPS + 1))
    return {"steps": steps, "weights": load_file(root / "out" / "pretrain" / "trainable.safetensors")}


def _assert_same_run(reference: dict, run_id: str, out: Path) -> dict:
    """The run ``run_id`` logged every step once, with the reference's losses, and ended at its weights."""
    got = _steps(run_id)
    assert [step for step, _ in got] == [step for step, _ in reference["steps"]]
    for (_, loss), (_, want) in zip(got, reference["steps"]):
        assert loss == pytest.approx(want, abs=1e-6)
    weights = load_file(out / "pretrain" / "trainable.safetensors")
    for name, tensor in reference["weights"].items():
        assert (weights[name] - tensor).abs().max().item() < 1e-6, name
    summary = json.loads((out / "pretrain" / "result.json").read_text())
    assert summary["steps"] == STEPS and summary["final_loss"] == pytest.approx(got[-1][1], abs=1e-6)
    return summary


def test_a_killed_stage_restarts_to_the_same_steps_and_losses(reference, tiny_world, tiny_zoo, tmp_path,
                                                              fault_ledger):
    config_file = _config_file(tiny_world, tiny_zoo, tmp_path, "out")
    # each restart resumes from the last checkpoint the killed run marked complete
    runs = (("step:2", None, None), ("checkpoint:3", 1, None), ("warehouse:4", 2, "step_3: not marked complete"),
            (None, 3, None))
    for fault, resumed_at, warning in runs:
        run = _run_stage(config_file, "killed", fault)
        if resumed_at:
            assert f"at step {resumed_at}/{STEPS}" in run.stderr, run.stderr[-3000:]
        if warning:
            assert warning in run.stderr
        assert run.returncode == (-signal.SIGKILL if fault else 0), run.stderr[-3000:]
    _assert_same_run(reference, "killed", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "pretrain" / "checkpoints").glob("step_*")) == [
        f"step_{STEPS - 1}", f"step_{STEPS}"]  # train.keep_checkpoints = 2
    for fault, _, _ in runs[:-1]:
        fault_ledger.record(f"training killed at {fault}", survived=True)


def test_two_cpu_ranks_match_one_and_a_killed_rank_fails_the_job_then_resumes(
    reference, tiny_world, tiny_zoo, tmp_path, monkeypatch, fault_ledger
):
    from mgllava.train.launch import JobFailed, run_stage_job

    config = load_config(path=_config_file(tiny_world, tiny_zoo, tmp_path, "out"))
    shared_memory = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))  # DeepSpeed's CPU all-reduce
    monkeypatch.setenv(FAULT_ENV, "step:3@1")  # rank 1 dies in step 3; the launcher stops rank 0
    with pytest.raises(JobFailed) as failed:
        run_stage_job(config, "pretrain", "ranks", lambda line: None, num_gpus=2)
    assert failed.value.returncode != 0
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shared_memory  # none left behind
    [(status, reason)] = _warehouse_rows("SELECT status, reason FROM train_stages WHERE run_id = ?", "ranks")
    assert status == "failed" and reason  # rank 0's own error (gloo lost its peer) or the launcher's exit code

    monkeypatch.delenv(FAULT_ENV)
    result = run_stage_job(config, "pretrain", "ranks", lambda line: None, num_gpus=2)
    assert result["resumed_from"] == 2
    assert json.loads((tmp_path / "out" / "pretrain" / "checkpoints" / "plan.json").read_text())["world_size"] == 2
    _assert_same_run(reference, "ranks", tmp_path / "out")
    assert _warehouse_rows("SELECT status FROM train_stages WHERE run_id = ?", "ranks") == [("completed",)]
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shared_memory
    fault_ledger.record("one of 2 training ranks killed mid-run", survived=True)
