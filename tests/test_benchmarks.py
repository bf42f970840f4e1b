"""The benchmarks run at tiny sizes on a CPU and end in their JSON line (the GPU one too, so that it still
works when a GPU is lent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mgllava import child_environment

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(command: list[str], timeout: int, env: dict | None = None) -> tuple[dict, str]:
    """Run one benchmark script from the repository root; its last output line (the JSON) and its stderr."""
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env or child_environment(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("mode", [[], ["--forward-backward-only", "--gradient-checkpointing"]],
                         ids=["deepspeed-step", "forward-backward-checkpointed"])
def test_the_gpu_training_benchmark_runs_at_tiny_size_and_ends_in_its_json(mode, tmp_path):
    command = ["benchmarks/train_step_gpu.py", "--size", "tiny", "--steps", "2", "--warmup", "1",
               "--micro-batch", "2", "--boxes", "3", "--json", str(tmp_path / "out.json"), *mode]
    env = {**child_environment(), "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # not this process's world
    last, stderr = run_benchmark(command, timeout=300, env=env)
    assert last["benchmark"] == "train_step_gpu"
    assert last["samples_per_s"] > 0 and last["measured_steps"] == 2
    assert last["gradient_checkpointing"] == bool(mode)
    assert last["timed"] == ("forward + backward (no optimizer)" if mode else "DeepSpeed training step")
    assert last["counted_tflop_per_sample"] > 0 and last["analytic_tflop_per_sample"] > 0
    # every tower runs a real attention kernel: transformers' None (eager fallback) warns on stderr
    assert "config._attn_implementation` set to `None`" not in stderr


def test_the_loss_benchmark_runs_small_and_both_losses_agree():
    command = ["benchmarks/lm_loss.py", "--vocab", "2000", "--hidden", "64", "--layers", "1",
               "--batch", "2", "--seq", "64", "--repeats", "1"]
    last, _ = run_benchmark(command, timeout=300)
    assert last["benchmark"] == "lm_loss" and last["vocab"] == 2000
    losses = [last["results"][name]["loss"] for name in ("full_logits", "labelled_only")]
    assert abs(losses[0] - losses[1]) < 1e-4 and last["time_full_over_labelled"] > 0


@pytest.mark.slow
def test_the_batch_padding_benchmark_runs_small_and_ends_in_its_json(tmp_path):
    command = ["benchmarks/batch_padding.py", "--steps", "4", "--images", "12", "--work", str(tmp_path)]
    last, _ = run_benchmark(command, timeout=600)
    assert last["benchmark"] == "batch_padding" and [run["multiple"] for run in last["runs"]] == [1, 32]
    assert all(run["steps"] == 4 and len(run["s_per_step_by_quarter"]) == 4 for run in last["runs"])
    assert last["wall_unrounded_over_rounded"] > 0


@pytest.mark.slow
def test_the_training_overhead_benchmark_runs_small_and_ends_in_its_json(tiny_world, tiny_zoo, tmp_path):
    work = tmp_path / "work"  # the benchmark writes its checkpoints here, not next to the session's zoo
    work.mkdir()
    (work / "world").symlink_to(tiny_world)
    (work / "zoo").symlink_to(tiny_zoo)
    command = ["benchmarks/train_step.py", "--steps", "3", "--batch", "2", "--rounds", "2",
               "--breakdown", "--work", str(work)]
    last, _ = run_benchmark(command, timeout=600)
    assert last["benchmark"] == "train_step" and last["steps"] == 3 and last["batch"] == 2
    assert len(last["round_full_over_plain"]) == 2
    assert last["full_over_plain"] == pytest.approx(last["full_s_per_step"] / last["plain_s_per_step"], rel=0.01)
    assert all(last[key] > 0 for key in ("cached_s_per_step", "engine_s_per_step", "data_cpu_s_per_batch"))
