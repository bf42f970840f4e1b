"""Prefect flow ``mgllava`` (deployment ``full-train``): the whole recipe, end to end.

world + tiny zoo (embedded default) -> detector (trained on the shapes world when no
weights are given) -> detect -> pretrain -> finetune -> evaluate, then artifacts: the
score table, the box-table summary, the loss curves and links to the checkpoints.

Wiring only; every stage is a function of :mod:`mgllava.shapes`, :mod:`detector`,
:mod:`mgllava.train` or :mod:`mgllava.eval`. Expensive stages are Prefect tasks
cached on content keys (:mod:`flows.keys`): a re-run with the same inputs
shows them ``Cached`` and logs it; ``fresh=True`` recomputes. Training stages
retry once and resume from their last checkpoint.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from detector.inputs import default_sources
from flows import reports
from flows.detect import detect_flow
from flows.evaluate import evaluate
from flows.keys import detector_train_key, evaluate_key, train_stage_key
from mgllava.config import Config, ConfigError, load_config
from mgllava.shapes import BackgroundZoo, prepare_world


def _by_key(context, parameters) -> str:
    return parameters["key"]


@task(name="shapes-world", cache_policy=NO_CACHE)  # idempotent on disk, logs when it skips
def shapes_world(config: Config) -> str | None:
    return prepare_world(config)


@task(name="tiny-zoo", cache_policy=NO_CACHE)  # idempotent on disk, logs when it skips
def tiny_zoo(zoo: BackgroundZoo) -> str | None:
    return zoo.result()


@task(name="train-detector", cache_key_fn=_by_key, persist_result=True)
def fit_detector(config: Config, key: str) -> dict:
    """Train the YOLO of ``detector.train`` into ``work_dir/detector``: its metrics, ``weights`` the best."""
    from detector.train import train_detector

    settings = config.detector.train
    metrics = train_detector(
        settings.data, Path(config.work_dir) / "detector", base=settings.base, epochs=settings.epochs,
        imgsz=settings.imgsz, batch=settings.batch, min_map50=settings.min_map50, device=config.detector.device,
        progress=reports.Progress("detector-train-progress", "Detector training (epochs)"))
    reports.publish_detector_training(metrics)
    get_run_logger().info("detector mAP50 %.3f on held-out images -> %s", metrics["map50"], metrics["weights"])
    return metrics


def detector_weights(config: Config, refresh: dict, logger) -> str:
    """``detector.model`` when it exists, else a detector trained on ``detector.train.data`` (the tiny
    preset: the shapes world's labels) by the cached task :func:`fit_detector`: the weights to detect with."""
    if Path(config.detector.model).exists():
        return config.detector.model
    if not config.detector.train.data:
        raise ConfigError(
            f"config field 'detector.model': weights not found: {config.detector.model} "
            "(give weights, or detector.train.data to train a detector)"
        )
    return _run_cached(fit_detector, "train-detector", refresh, logger, lambda metrics: [metrics["weights"]],
                       config, key=detector_train_key(config))["weights"]


@task(name="train-stage", task_run_name="train-{stage}", cache_key_fn=_by_key, persist_result=True, retries=1)
def train_stage(config: Config, stage: str, run_id: str, key: str) -> dict:
    from mgllava.train.launch import run_stage_job

    progress = reports.Progress(f"{stage}-progress", f"Training stage {stage} (run {run_id})")
    return run_stage_job(config, stage, run_id, get_run_logger().info, progress=progress, quiet=True)


@task(name="evaluate-model", cache_key_fn=_by_key, persist_result=True)
def evaluate_model(config_file: str, model_dir: str, key: str) -> list[dict]:
    return evaluate(model_dir=model_dir, config_file=config_file)


def _run_cached(task, name: str, refresh: dict, logger, outputs, *args, **kwargs):
    """``task``'s result, reused from Prefect's cache when its key matches (logged) unless one of the files
    it names (``outputs(result)``) is gone (its directory deleted since): then it is computed again."""
    state = task.with_options(**refresh)(*args, return_state=True, **kwargs)
    result = state.result()
    if state.name == "Cached":
        missing = [path for path in outputs(result) if path and not Path(path).exists()]
        if not missing:
            logger.info("%s: inputs unchanged, reused the cached result (fresh=True recomputes)", name)
            return result
        logger.info("%s: the cached result's %s no longer exists: computing it again", name, missing[0])
        result = task.with_options(refresh_cache=True)(*args, **kwargs)
    return result


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(config: Config, box_manifest: dict, stages: dict, scores: list[dict]) -> None:
    """The run's pictures under ``<work_dir>/reports`` (and the box table's gallery), shown as artifacts."""
    out = Path(config.work_dir) / "reports"
    reports.publish_boxes(config.data.boxes_dir, box_manifest)
    reports.publish_training(sorted({s["run_id"] for s in stages.values() if s.get("run_id")}), stages, out)
    reports.publish_scores(scores, out)


# log_prints stays off: the library logs through its loggers (reports.project_logs), and print() under it would
# also send what third-party code prints, e.g. the bytecode that dill disassembles when `datasets` pickles
@flow(name="mgllava", flow_run_name="full-train-{preset}", log_prints=False)
def full_train(
    preset: str | None = "tiny",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    benchmarks: list[str] | None = None,
    work_dir: str | None = None,
    fresh: bool = False,
) -> list[dict]:
    """Train and evaluate MG-LLaVA end to end; returns the score table (also in DuckDB).

    ``preset``/``config_file`` pick the configuration, ``overrides`` are ``--set`` style
    ``key=value`` strings, ``benchmarks`` replaces ``eval.tasks``, ``work_dir`` moves every
    output, and ``fresh`` recomputes cached stages.
    """
    from mgllava.train.job import new_run_id, reset_stage, resumable

    reports.project_logs()
    logger = get_run_logger()
    extra = list(overrides or [])
    if work_dir:
        extra.append(f"work_dir={work_dir}")
    if benchmarks:
        extra.append("eval.tasks=[" + ",".join(benchmarks) + "]")
    config = load_config(preset=None if config_file else preset, path=config_file, overrides=extra)
    config_path = str(config.save(Path(config.work_dir) / "config.yaml"))
    logger.info("configuration %s, work dir %s", config.preset, config.work_dir)
    refresh = {"refresh_cache": True} if fresh else {}

    shapes_world(config)
    import torch

    cores = torch.get_num_threads()
    # the tiny zoo's LLM (if it is to be built) trains in a child process on one core while this one
    # trains the detector and detects on the others; then this one pretrains the towers, then the child
    # gets every core (BackgroundZoo.result)
    with BackgroundZoo(config, threads=1, later_threads=cores, child_logging=reports.child_logging()) as zoo:
        if zoo.running:
            torch.set_num_threads(max(1, cores - 1))
        try:
            weights = detector_weights(config, refresh, logger)
            from detector.model import DetectorSettings

            settings = DetectorSettings.from_config(  # the weights passed on, the config left as loaded
                config.detector, model=weights,
                allow_absolute_image_paths=config.data.allow_absolute_image_paths).to_json()
            box_manifest = detect_flow(sources=default_sources(config), out=config.data.boxes_dir,
                                       settings=settings, image_root=config.data.image_root,
                                       fresh=True)  # a new detector redoes it
        finally:
            torch.set_num_threads(cores)
        tiny_zoo(zoo)
    run_id = new_run_id()
    stages = {}
    for stage in ("pretrain", "finetune"):
        if fresh or not resumable(config, stage):
            reset_stage(config, stage)  # fresh, or its checkpoints are another input's: start over
        stages[stage] = _run_cached(train_stage, f"train-{stage}", refresh, logger,
                                    lambda summary: [summary["trainable_weights"], summary["export_dir"]],
                                    config, stage, run_id, key=train_stage_key(config, stage))
    model_dir = stages["finetune"]["export_dir"]
    scores = _run_cached(evaluate_model, "evaluate", refresh, logger, lambda rows: [],
                         config_path, model_dir, key=evaluate_key(config, model_dir))
    publish_artifacts(config, box_manifest, stages, scores)
    logger.info("done at %s: %d score rows", dt.datetime.now().isoformat(timespec="seconds"), len(scores))
    return scores
