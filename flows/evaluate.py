"""Prefect flow ``evaluate``: one task per benchmark, run concurrently, results into DuckDB.

Wiring only; the work is in :mod:`mgllava.eval.evaluate` (``mgllava evaluate`` runs the same
without Prefect). The benchmarks run as Prefect tasks
on a thread pool (``max_workers``, default 2): threads of one process share one copy of the
model (:func:`mgllava.eval.lmms_model.load_model`), so memory grows with the number of
benchmarks in flight only by their data and activations. A benchmark that fails becomes a
``failed`` result with its error; the others carry on. Results are written from the flow's
own thread, one benchmark per transaction, as they complete, so parallel tasks never write
to DuckDB at the same time and a crash keeps what finished before it. Whatever ends the run
early (an error, an interrupt) marks it ``failed`` in ``eval_runs`` with the reason
(:func:`warehouse.eval.failure_recorded`).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows import reports
from mgllava.eval.evaluate import DEFAULT_MAX_WORKERS

os.environ.setdefault("YOLO_OFFLINE", "1")


@task(name="evaluate-benchmark", task_run_name="evaluate-{name}", cache_policy=NO_CACHE)
def benchmark_task(name: str, plan: dict, include_path: str, model_kwargs: dict, limit: int | None,
                   output_dir: str) -> dict:
    from mgllava.eval.runner import run_benchmark
    from mgllava.eval.tasks import TaskPlan

    return run_benchmark(TaskPlan(**plan), include_path, model_kwargs, limit, output_dir).to_json()


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_WORKERS), log_prints=False)
def evaluate(model_dir: str, preset: str | None = None, config_file: str | None = None,
             overrides: list[str] | None = None, benchmarks: list[str] | None = None, run_id: str | None = None,
             warehouse: str | None = None) -> list[dict]:
    """Evaluate the exported model ``model_dir`` on ``benchmarks`` (default ``config.eval.tasks``).

    Returns the checkpoint's score table: one dict per (task, metric), with the status and
    reason of failed and skipped benchmarks (:func:`mgllava.eval.evaluate.evaluate`).
    """
    from mgllava.config import load_config
    from mgllava.eval.evaluate import evaluate as evaluate_model
    from mgllava.eval.runner import new_eval_run_id

    reports.project_logs()
    config = load_config(preset=preset, path=config_file, overrides=overrides or [])
    run_id = run_id or new_eval_run_id()
    rows = evaluate_model(config, model_dir, benchmarks, run_id, warehouse, run_ready=_as_prefect_tasks)
    reports.publish_scores(rows, Path(config.work_dir) / "eval" / run_id)
    return rows


def _as_prefect_tasks(run, plans):
    """Each ready benchmark as a Prefect task on the flow's task runner, yielded as it finishes (with a
    progress artifact over the benchmarks)."""
    progress = reports.Progress("evaluate-progress", f"Evaluation {run.run_id}: {len(plans)} benchmarks", interval=0)
    futures = {benchmark_task.submit(plan.name, asdict(plan), run.include_path, run.model_kwargs, run.limit,
                                     run.output_dir): plan for plan in plans}
    for done, future in enumerate(as_completed(list(futures)), start=1):
        progress(done / len(futures), f"{done}/{len(futures)} benchmarks done ({futures[future].name} last)")
        yield futures[future], future.result


def run_evaluate(model_dir: str, max_workers: int = DEFAULT_MAX_WORKERS, **kwargs) -> list[dict]:
    """:func:`evaluate` with ``max_workers`` benchmarks in flight at once."""
    return evaluate.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max_workers))(model_dir, **kwargs)
