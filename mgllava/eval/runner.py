"""An evaluation run: its preparation, and one benchmark through lmms-eval at a time.

:func:`prepare_evaluation` plans the benchmarks (:func:`mgllava.eval.tasks.plan_tasks`),
writes the run's task files under ``<work_dir>/eval/<run_id>/tasks`` and records the run in
the warehouse; the Prefect flow ``evaluate`` (``flows/evaluate.py``) then runs
:func:`run_benchmark` per benchmark and stores each result as it arrives.

:func:`run_benchmark` evaluates one :class:`~mgllava.eval.tasks.TaskPlan` with
``lmms_eval.evaluator.simple_evaluate`` on its own :class:`MGLLaVALmms` instance (the torch
model underneath is shared, see :func:`mgllava.eval.lmms_model.load_model`) and a
``TaskManager`` that indexes only the run's local task files (the stock task files they
include are read through ``include:``; indexing every stock task would take ~10 s per call).
Whatever goes wrong inside becomes a ``failed`` :class:`BenchmarkResult` carrying the error,
so one broken benchmark never takes the others' results with it.

Per-sample scores: the stock tasks' ``process_results`` values differ in shape; a sample's
``score`` is read from its first metric: a number as is; a dict's ``score`` (POPE, MME);
``pred`` == ``answer`` (SEED-Bench); the option letter extracted from ``prediction`` ==
``answer`` (MMBench, with lmms-eval's own rule-based extractor); else none.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mgllava.eval.boxes import DETECTOR_RECORD, EXPORT_DETECTOR_DIR, BoxesUnavailable, recorded_detector
from mgllava.eval.tasks import TaskPlan, plan_tasks, write_task_files

log = logging.getLogger(__name__)


@dataclass
class BenchmarkResult:
    name: str
    task: str
    status: str  # completed, failed or skipped
    reason: str = ""  # why skipped, or the error of a failed run
    data_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    n: int = 0
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    generate_seconds: float = 0.0
    box_origins: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _metric_values(task_results: dict) -> dict[str, float]:
    """``{"pope_accuracy": 0.5, "exact_match[flexible-extract]": ...}`` from a task's results entry."""
    metrics = {}
    for key, value in task_results.items():
        name, _, filter_name = key.partition(",")
        if "_stderr" in name or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        metrics[name if filter_name in ("", "none") else f"{name}[{filter_name}]"] = float(value)
    return metrics


def sample_score(value) -> float | None:
    """A sample's score from one metric's per-sample value (see the module docstring)."""
    if isinstance(value, bool | int | float):
        return float(value)
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("score"), bool | int | float):
        return float(value["score"])
    if "pred" in value and "answer" in value:
        return float(str(value["pred"]).strip().lower() == str(value["answer"]).strip().lower())
    if "prediction" in value and "answer" in value:
        from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

        choices = [c for c in "ABCDE" if isinstance(value.get(c), str) and value[c] not in ("", "nan")]
        return float(extract_mcq_answer(str(value["prediction"]), choices=choices or None) == value["answer"])
    return None


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return _text(value[0]) if len(value) == 1 else str([_text(v) for v in value])
    return str(value)


def question_slice(doc: dict) -> dict:
    """A question's slice from its record's ``object_size`` (small, medium, large: the object asked
    about) and ``small_text`` (it asks about small rendered text) columns, as the shapes world's sets
    carry them (:mod:`mgllava.shapes.world.benchmarks`); None where a record has no such column."""
    size, small_text = doc.get("object_size"), doc.get("small_text")
    return {"object_size": str(size) if size else None,
            "small_text": None if small_text is None else bool(small_text)}


def _predictions(samples: list[dict], metric_names: list[str], boxes_used: dict, task: str) -> list[dict]:
    rows = []
    for sample in samples:
        doc = sample.get("doc") or {}
        prompt = next((a for a in sample.get("arguments", []) if isinstance(a, str)), None)
        score = next((sample_score(sample[m]) for m in metric_names if m in sample), None)
        n_boxes, origin = boxes_used.get((task, sample["doc_id"]), (None, None))
        rows.append({
            "doc_id": int(sample["doc_id"]),
            "question": _text(doc.get("question")) or prompt,
            "prompt": prompt,
            "target": _text(sample.get("target")),
            "prediction": _text(sample.get("filtered_resps")),
            "score": score,
            "n_boxes": n_boxes,
            "box_origin": origin,
            **question_slice(doc),
        })
    return rows


def _unwrap(exc: Exception) -> Exception:
    """The error inside a retry wrapper (lmms-eval loads datasets under ``tenacity`` retries)."""
    last_attempt = getattr(exc, "last_attempt", None)
    inner = last_attempt.exception() if last_attempt is not None else None
    return inner if isinstance(inner, Exception) else exc


# lmms-eval registers its YAML "!function" constructor globally, bound to the file being read, so
# two benchmarks loading their task files at once can resolve each other's functions: load one at a time.
_TASK_LOADING = threading.Lock()


def run_benchmark(plan, include_path: str | Path, model_kwargs: dict, limit: int | None = None,
                  output_dir: str | Path | None = None) -> BenchmarkResult:
    """Evaluate one planned benchmark; a skipped plan comes back skipped, an error as failed."""
    result = BenchmarkResult(plan.name, plan.task, plan.status, plan.reason, plan.data_dir)
    if plan.status != "ready":
        return result
    t0 = time.perf_counter()
    log.info("benchmark %s: evaluating %s from %s (limit %s)", plan.name, plan.task, plan.data_dir, limit)
    try:
        from lmms_eval import evaluator
        from lmms_eval.tasks import TaskManager, get_task_dict

        from mgllava.eval.lmms_model import MGLLaVALmms

        lm = MGLLaVALmms(**model_kwargs)
        with _TASK_LOADING:
            manager = TaskManager(verbosity="WARNING", include_path=str(include_path), include_defaults=False)
            tasks = list(get_task_dict([plan.task], manager).values())
        output_dir = Path(output_dir or Path(include_path).parent / "outputs") / plan.name
        out = evaluator.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
            bootstrap_iters=0, verbosity="WARNING", cli_args=argparse.Namespace(output_path=str(output_dir), process_with_media=False),
        )
        if not out or plan.task not in out.get("results", {}):
            raise RuntimeError(f"lmms-eval returned no results for {plan.task}")
        result.metrics = _metric_values(out["results"][plan.task])
        result.n = int(out["n-samples"][plan.task]["effective"])
        metric_names = [m.partition(",")[0] for m in out["results"][plan.task] if "," in m]
        result.predictions = _predictions(out["samples"][plan.task], metric_names, lm.boxes_used, plan.task)
        result.generate_seconds = lm.stats["generate_s"]
        result.box_origins = dict(lm.box_source.counts)
        result.status, result.reason = "completed", ""
        log.info("benchmark %s: %d samples in %.1f s: %s", plan.name, result.n, time.perf_counter() - t0,
                 ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
    except (Exception, BoxesUnavailable) as exc:  # a failing benchmark is a result, not a crash of the run
        exc = _unwrap(exc)
        log.error("benchmark %s failed: %s", plan.name, exc)
        tail = "".join(traceback.format_exception(exc)[-3:]).strip()
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}\n{tail}"
        result.metrics, result.predictions, result.n = {}, [], 0
    result.seconds = time.perf_counter() - t0
    return result


@dataclass
class EvalRun:
    """A prepared evaluation run: what :func:`run_benchmark` needs for each plan."""

    run_id: str
    checkpoint: str  # the export directory, absolute
    plans: list[TaskPlan]
    include_path: str
    model_kwargs: dict
    limit: int | None
    output_dir: str


def new_eval_run_id() -> str:
    return datetime.now(timezone.utc).strftime("eval-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def detector_settings(config):
    """The configured detector for images without box rows, or None when its weights are absent."""
    from detector.model import DetectorSettings

    model = config.detector.model
    if not (Path(model).is_file() or model.endswith((".yaml", ".yml"))):
        log.warning("detector weights %s not found: only images in the box table get boxes", model)
        return None
    return DetectorSettings.from_config(config.detector)


def model_kwargs(config, model_dir: str | Path, batch_size: int | None = None) -> dict:
    """:class:`~mgllava.eval.lmms_model.MGLLaVALmms` arguments for ``model_dir`` under ``config``: the
    detector the export recorded (None lets the model use it), else the configured one."""
    recorded = (Path(model_dir) / EXPORT_DETECTOR_DIR / DETECTOR_RECORD).is_file()
    return {
        "pretrained": str(Path(model_dir).resolve()),
        "boxes_dir": config.data.boxes_dir,
        "detector": None if recorded else detector_settings(config),
        "detection_cache": str(Path(config.work_dir) / "eval" / "detections"),
        "batch_size": batch_size or config.eval.batch_size,
        "max_new_tokens": config.eval.max_new_tokens,
        "attention": config.eval.attention,
    }


def prepare_evaluation(config, model_dir: str | Path, tasks: list[str] | None = None, run_id: str | None = None,
                       db_path=None) -> EvalRun:
    """Plan the benchmarks, write the task files, record the run start; fail early on a bad model dir."""
    from mgllava.model.configuration_mgllava import EXPORT_CONFIG, LEGACY_EXPORT_CONFIG
    from warehouse.eval import record_run_start

    model_dir = Path(model_dir).expanduser().resolve()
    if not any((model_dir / name).is_file() for name in (EXPORT_CONFIG, LEGACY_EXPORT_CONFIG)):
        raise FileNotFoundError(f"{model_dir} is not an exported MG-LLaVA directory (no {EXPORT_CONFIG})")
    run_id = run_id or new_eval_run_id()
    plans = plan_tasks(config, tasks)
    run_dir = Path(config.work_dir) / "eval" / run_id
    include_path = write_task_files(plans, run_dir / "tasks")
    kwargs = model_kwargs(config, model_dir)
    detector = kwargs["detector"] or (recorded_detector(model_dir) or (None,))[0]
    detector = detector.model if detector else None
    record_run_start(run_id, str(model_dir), config, [p.name for p in plans], kwargs["boxes_dir"], detector,
                     db_path=db_path)
    return EvalRun(run_id, str(model_dir), plans, str(include_path), kwargs, config.eval.limit,
                   str(run_dir / "outputs"))
