"""Prefect flow ``evaluate``: one task per benchmark, run concurrently, results into DuckDB.

Wiring only; the work is in :mod:`mgllava.eval.runner`. The benchmarks run as Prefect tasks
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

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

os.environ.setdefault("YOLO_OFFLINE", "1")

DEFAULT_MAX_WORKERS = 2


@task(name="evaluate-benchmark", task_run_name="evaluate-{name}", cache_policy=NO_CACHE)
def benchmark_task(name: str, plan: dict, include_path: str, model_kwargs: dict, limit: int | None,
                   output_dir: str) -> dict:
    from mgllava.eval.runner import run_benchmark
    from mgllava.eval.tasks import TaskPlan

    return run_benchmark(TaskPlan(**plan), include_path, model_kwargs, limit, output_dir).to_json()


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_WORKERS), log_prints=False)
def evaluate(model_dir: str, preset: str | None = None, config_file: str | None = None,
             overrides: list[str] | None = None, tasks: list[str] | None = None, run_id: str | None = None,
             db_path: str | None = None) -> list[dict]:
    """Evaluate the exported model ``model_dir`` on ``tasks`` (default ``config.eval.tasks``).

    Returns the checkpoint's score table: one dict per (task, metric), with the status and
    reason of failed and skipped benchmarks.
    """
    from mgllava.config import load_config
    from mgllava.eval.runner import BenchmarkResult, prepare_evaluation
    from warehouse.eval import failure_recorded, record_run_end, score_table, write_task_result

    logger = get_run_logger()
    config = load_config(preset=preset, path=config_file, overrides=overrides or [])
    run = prepare_evaluation(config, model_dir, tasks, run_id, db_path=db_path)
    logger.info("evaluation run %s of %s: %s", run.run_id, run.checkpoint,
                ", ".join(f"{p.name} ({p.status})" for p in run.plans))
    with failure_recorded(run.run_id, db_path=db_path):  # however the run ends early, it is marked failed
        results, futures = [], {}
        for plan in run.plans:
            if plan.status == "ready":
                future = benchmark_task.submit(plan.name, asdict(plan), run.include_path, run.model_kwargs, run.limit,
                                               run.output_dir)
                futures[future] = plan
            else:
                results.append(BenchmarkResult(plan.name, plan.task, plan.status, plan.reason).to_json())
                write_task_result(run.run_id, run.checkpoint, results[-1], db_path=db_path)
                logger.info("%s skipped: %s", plan.name, plan.reason)
        for future in as_completed(list(futures)):
            plan = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # the task itself crashed (run_benchmark reports its own errors)
                result = BenchmarkResult(plan.name, plan.task, "failed", f"{type(exc).__name__}: {exc}",
                                         plan.data_dir).to_json()
            write_task_result(run.run_id, run.checkpoint, result, db_path=db_path)
            results.append(result)
            if result["status"] == "completed":
                logger.info("%s: %d samples in %.1f s: %s", plan.name, result["n"], result["seconds"],
                            ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()))
            else:
                logger.error("%s failed: %s", plan.name, result["reason"].splitlines()[0])
        record_run_end(run.run_id, results, db_path=db_path)
    columns, rows = score_table(checkpoint=run.checkpoint, db_path=db_path)
    return [dict(zip(columns, row)) for row in rows]


def run_evaluate(model_dir: str, max_workers: int = DEFAULT_MAX_WORKERS, **kwargs) -> list[dict]:
    """:func:`evaluate` with ``max_workers`` benchmarks in flight at once."""
    return evaluate.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max_workers))(model_dir, **kwargs)
