"""One evaluation run of an exported model, benchmark by benchmark, results into the warehouse.

:func:`evaluate` plans the run (:func:`mgllava.eval.runner.prepare_evaluation`), runs each
ready benchmark (:func:`mgllava.eval.runner.run_benchmark`), and writes every outcome from the
calling thread as it arrives, one benchmark per transaction, so concurrent benchmarks never
write to DuckDB at the same time and a crash keeps what finished before it. Whatever ends the
run early (an error, an interrupt) marks it ``failed`` in ``eval_runs`` with the reason.

How the benchmarks run is the caller's: by default on a thread pool of ``max_workers``
threads in this process (``mgllava evaluate``; threads share one copy of the model, see
:func:`mgllava.eval.lmms_model.load_model`); the Prefect flow ``evaluate`` passes
``run_ready`` that runs them as Prefect tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

from mgllava.eval.runner import BenchmarkResult, EvalRun, prepare_evaluation, run_benchmark
from mgllava.eval.tasks import TaskPlan

log = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 2

# (the run, its ready plans) -> (plan, result-or-exception getter) as each benchmark finishes
RunReady = Callable[[EvalRun, list[TaskPlan]], Iterable[tuple[TaskPlan, Callable[[], dict]]]]


def on_threads(max_workers: int = DEFAULT_MAX_WORKERS) -> RunReady:
    """Run the ready benchmarks on ``max_workers`` threads of this process."""

    def run_ready(run: EvalRun, plans: list[TaskPlan]) -> Iterator[tuple[TaskPlan, Callable[[], dict]]]:
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="benchmark") as pool:
            futures = {pool.submit(lambda p=plan: run_benchmark(p, run.include_path, run.model_kwargs, run.limit,
                                                                run.output_dir).to_json()): plan for plan in plans}
            for future in as_completed(futures):
                yield futures[future], future.result

    return run_ready


def evaluate(config, model_dir: str, benchmarks: list[str] | None = None, run_id: str | None = None,
             warehouse: str | None = None, run_ready: RunReady | None = None) -> list[dict]:
    """Evaluate the exported model ``model_dir`` on ``benchmarks`` (default ``config.eval.tasks``).

    Returns the checkpoint's score table: one dict per (task, metric), with the status and
    reason of failed and skipped benchmarks. ``warehouse``: the DuckDB file (default
    ``$MGLLAVA_HOME/warehouse.duckdb``). Raises ``FileNotFoundError`` for a directory that is
    not an export, before anything is recorded.
    """
    from warehouse import eval as wh

    run = prepare_evaluation(config, model_dir, benchmarks, run_id, db_path=warehouse)
    log.info("evaluation run %s of %s: %s", run.run_id, run.checkpoint,
             ", ".join(f"{p.name} ({p.status})" for p in run.plans))
    with wh.failure_recorded(run.run_id, db_path=warehouse):  # however the run ends early, it is marked failed
        results = []
        for plan in run.plans:
            if plan.status != "ready":
                results.append(BenchmarkResult(plan.name, plan.task, plan.status, plan.reason).to_json())
                wh.write_task_result(run.run_id, run.checkpoint, results[-1], db_path=warehouse)
                log.info("%s skipped: %s", plan.name, plan.reason)
        ready = [plan for plan in run.plans if plan.status == "ready"]
        for plan, outcome in (run_ready or on_threads())(run, ready):
            try:
                result = outcome()
            except Exception as exc:  # the task itself crashed (run_benchmark reports its own errors)
                result = BenchmarkResult(plan.name, plan.task, "failed", f"{type(exc).__name__}: {exc}",
                                         plan.data_dir).to_json()
            wh.write_task_result(run.run_id, run.checkpoint, result, db_path=warehouse)
            results.append(result)
            if result["status"] == "completed":
                log.info("%s: %d samples in %.1f s: %s", plan.name, result["n"], result["seconds"],
                         ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()))
            else:
                log.error("%s failed: %s", plan.name, result["reason"].splitlines()[0])
        wh.record_run_end(run.run_id, results, db_path=warehouse)
    columns, rows = wh.score_table(checkpoint=run.checkpoint, db_path=warehouse)
    return [dict(zip(columns, row)) for row in rows]
