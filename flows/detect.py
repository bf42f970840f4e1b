"""Prefect flow ``detect``: the detection stage with its shards fanned out as tasks.

Wiring only; the work is in :mod:`detector.pipeline`. Locally the shards run one
after another in this process (the model already uses every core); given a
Dask scheduler address they run as tasks on that cluster
(``prefect_dask.DaskTaskRunner(address=...)``), whose workers must see the same
file system. Both write the same box table. The flow holds the output
directory's run lock (:func:`detector.pipeline.run_lock`) in its own process
from planning to finishing, so a second run on the same directory is refused
while the shard tasks, wherever they run, write their own files.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows import reports

os.environ.setdefault("YOLO_OFFLINE", "1")


@task(name="detect-prepare", cache_policy=NO_CACHE)  # never cached: the files on disk are the state
def prepare_task(sources: list[str], out: str, image_root: str | None, settings: dict, shard_size: int,
                 fresh: bool, run_id: str) -> dict:
    from detector.pipeline import prepare_run, settings_from_manifest

    plan = prepare_run(sources, out, settings_from_manifest({"settings": settings}), image_root=image_root,
                       shard_size=shard_size, overwrite=fresh, run_id=run_id)
    return {"out": str(plan.out), "fingerprint": plan.fingerprint, "n_images": plan.n_images,
            "n_shards": plan.n_shards, "pending": plan.pending, "complete": plan.complete,
            "manifest": plan.manifest}


@task(name="detect-shard", task_run_name="detect-shard-{index}", cache_policy=NO_CACHE)
def shard_task(out: str, index: int) -> dict:
    from detector.pipeline import run_shard

    return run_shard(out, index).to_json()


@task(name="detect-finalize", cache_policy=NO_CACHE)
def finalize_task(out: str, computed: list[int], started_at: str, run_id: str) -> dict:
    from detector.pipeline import finalize_run

    return finalize_run(out, computed=computed, started_at=started_at, run_id=run_id)


@task(name="detect-register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def register_task(out: str) -> None:
    """The box table's row in ``box_runs`` and the box views, in the DuckDB warehouse."""
    from warehouse.db import register_box_table

    register_box_table(out)


@flow(name="detect", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=False)
def detect_flow(sources: list[str], out: str, settings: dict, image_root: str | None = None,
                shard_size: int = 256, fresh: bool = False) -> dict:
    """Detect boxes on every distinct image of ``sources`` into the box table ``out``.

    ``settings``: :meth:`detector.model.DetectorSettings.to_json`; ``fresh``: replace a box table
    of another run in ``out``. Returns the manifest.
    """
    from detector.pipeline import run_lock

    reports.project_logs()
    with run_lock(out) as run_id:
        return _detect_locked(sources, out, settings, image_root, shard_size, fresh, run_id)


def _detect_locked(sources, out, settings, image_root, shard_size, fresh, run_id) -> dict:
    import datetime as dt

    logger = get_run_logger()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    plan = prepare_task(sources, out, image_root, settings, shard_size, fresh, run_id)
    if plan["complete"]:
        logger.info("box table %s is already complete for these inputs and detector (run %s): skipped",
                    plan["out"], plan["fingerprint"][:12])
        register_task(plan["out"])
        reports.publish_boxes(plan["out"], plan["manifest"])
        return {**plan["manifest"], "_skipped": True}
    pending = plan["pending"]
    logger.info("run %s: %d images in %d shards, %d to compute", plan["fingerprint"][:12], plan["n_images"],
                plan["n_shards"], len(pending))
    progress = reports.Progress("detect-progress", f"Detection: {len(pending)} shards of {plan['out']}")
    futures = shard_task.map(plan["out"], pending)
    done_images = 0
    todo_images = sum(min(plan["n_images"], (i + 1) * shard_size) - i * shard_size for i in pending)
    for k, future in enumerate(as_completed(futures), start=1):
        res = future.result()
        done_images += res["images"]
        logger.info("shard %d done (%d/%d shards, %d/%d images, %.0f%%): %d boxes, %d rejects",
                    res["shard"], k, len(pending), done_images, todo_images,
                    100.0 * done_images / max(todo_images, 1), res["boxes"], res["rejects"])
        progress(done_images / max(todo_images, 1), f"{k}/{len(pending)} shards, {done_images}/{todo_images} images")
    manifest = finalize_task(plan["out"], pending, started, run_id)
    register_task(plan["out"])
    reports.publish_boxes(plan["out"], manifest)
    t = manifest["totals"]
    logger.info("detect: %d images: %d rows (%d boxes), %d rejects -> %s", t["images"], t["rows"], t["boxes"],
                t["rejects"], plan["out"])
    return manifest


def detect(sources: list[str], out: str, settings: dict, image_root: str | None = None, shard_size: int = 256,
           fresh: bool = False, dask_address: str | None = None) -> dict:
    """Run :func:`detect_flow` locally, or on the Dask cluster at ``dask_address``."""
    runner_flow = detect_flow
    if dask_address:
        from prefect_dask import DaskTaskRunner

        runner_flow = detect_flow.with_options(task_runner=DaskTaskRunner(address=dask_address))
    return runner_flow(sources=[str(s) for s in sources], out=str(out), settings=settings,
                       image_root=str(image_root) if image_root else None, shard_size=shard_size,
                       fresh=fresh)
