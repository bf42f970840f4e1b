"""``mgllava train --stage pretrain|finetune``: one stage of the recipe, end to end.

Loads and checks the configuration, the conversations and the box tables, builds
MG-LLaVA in the stage's trainable set-up (finetune starts from pretrain's weights),
runs :func:`mgllava.train.engine.run_stage`, writes the stage's outputs and records
metrics, skip tallies and the stage's result in the DuckDB warehouse.

Outputs under ``train.output_dir/<stage>/``::

    checkpoints/                 DeepSpeed checkpoints (resume from here), content_key.json
    trainable.safetensors        the stage's trainable weights
    export/                      (finetune) the self-contained model directory
    result.json                  paths, steps, load report and skip tallies

and beside it ``.<stage>.lock`` (held by the running job: a second run of the stage
stops with :class:`StageBusy`) and ``<stage>.warehouse-pending.jsonl`` (warehouse
writes made while the warehouse was busy, loaded by the next write that gets it).
The stage's ``train_stages`` row ends ``completed``, or ``failed`` with the error.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

from mgllava.config import Config, ConfigError
from mgllava.train.schedule import gradient_accumulation, load_user_deepspeed_config, modality_lengths

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def stage_dir(config: Config, stage: str) -> Path:
    return Path(config.train.output_dir) / stage


def warehouse_spool(config: Config, stage: str) -> Path:
    """Where the stage's warehouse writes wait while the warehouse is busy (survives ``--fresh``)."""
    return Path(config.train.output_dir) / f"{stage}.warehouse-pending.jsonl"


LOCK_ENV = "MGLLAVA_STAGE_LOCK"  # the lock file a launching process holds for the job's ranks


class StageBusy(RuntimeError):
    """Another run holds the training stage's output directory."""


@contextmanager
def stage_lock(out: Path) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``.<stage>.lock`` beside the stage directory ``out`` while the block runs.

    Raises :class:`StageBusy` naming the directory and the holder's pid if another process holds it,
    except when ``MGLLAVA_STAGE_LOCK`` names this lock: the launcher that started this job holds it.
    """
    path = out.parent / f".{out.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_for_us = os.environ.get(LOCK_ENV) == str(path)
            file.seek(0)
            holder = file.read().strip() or "unknown"
        else:
            held_for_us = holder = None
        if held_for_us:
            yield path
            return
        if holder:
            raise StageBusy(f"the training output directory {out} is in use by another run (pid {holder}); "
                            f"wait for it to finish or stop it")
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        try:
            yield path
        finally:
            file.truncate(0)
            fcntl.flock(file, fcntl.LOCK_UN)


def check_stage_inputs(config: Config, stage: str) -> None:
    """Fail at start-up, naming the field, if an input of the stage is missing or inconsistent."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    config.check_paths(
        "model.llm.path",
        "model.vision.clip_path",
        "model.vision.convnext_path",
        "data.image_root",
        f"data.{stage}_json",
    )
    gradient_accumulation(getattr(config.train, stage), int(os.environ.get("WORLD_SIZE", "1")), stage)
    load_user_deepspeed_config(config.train.deepspeed_config)
    if stage == "finetune" and not (stage_dir(config, "pretrain") / "trainable.safetensors").exists():
        raise ConfigError(
            f"finetune starts from the pretrain stage's weights, but "
            f"{stage_dir(config, 'pretrain') / 'trainable.safetensors'} does not exist: run the pretrain stage first"
        )


def load_boxes(boxes_dir: str | Path) -> dict:
    """Image key -> :class:`Boxes` from the box table (:class:`detector.tables.BoxTable`); empty (with a
    warning) if there is none. A table that cannot be trusted is one configuration error."""
    from detector.errors import BoxTableError
    from detector.tables import BoxTable
    from mgllava.model.boxes import Boxes

    boxes_dir = Path(boxes_dir)
    if not (boxes_dir / "boxes").exists():
        if any(boxes_dir.glob("part-*.parquet")):  # the boxes/ folder itself: training would silently see no boxes
            raise ConfigError(f"data.boxes_dir={boxes_dir} holds the Parquet parts themselves; "
                             f"it should be the detect output directory above them: {boxes_dir.parent}")
        log.warning("no box tables at %s: every image gets one all-zero box (one object token)", boxes_dir)
        return {}
    try:
        return {key: Boxes.from_detections(detections) for key, detections in BoxTable.open(boxes_dir).items()}
    except BoxTableError as exc:
        raise ConfigError(f"data.boxes_dir={boxes_dir}: {exc}") from None


def content_key(config: Config, stage: str) -> dict:
    """The stage's content key (config section, corpus, boxes, upstream weights) and its parts' digests."""
    from mgllava.lineage import train_key, train_key_parts

    return {"key": train_key(config, stage), "parts": train_key_parts(config, stage)}


def resumable(config: Config, stage: str) -> bool:
    """False when the stage's checkpoints were made from other inputs (resuming them is refused)."""
    from mgllava.train.engine import ResumeRefused, check_content_key

    try:
        check_content_key(stage_dir(config, stage) / "checkpoints", content_key(config, stage), stage)
    except ResumeRefused:
        return False
    return True


def reset_stage(config: Config, stage: str) -> None:
    """Discard a training stage's checkpoints and outputs, so that it starts over; under the stage's lock
    (:class:`StageBusy` while a run of the stage holds it)."""
    import shutil

    out = stage_dir(config, stage).resolve()
    with stage_lock(out):
        shutil.rmtree(out, ignore_errors=True)


def train(config: Config, stage: str, run_id: str | None = None, fresh: bool = False, progress: bool = True) -> dict:
    """Run one stage (resuming from its last checkpoint unless ``fresh``); return its result (rank 0).

    Rank 0 holds the stage's lock (:func:`stage_lock`) and records the stage in the warehouse;
    any failure marks its ``train_stages`` row ``failed`` with the error, then propagates.
    """
    import shutil

    from mgllava.lineage import box_table_fingerprint, corpus_digest
    from mgllava.train.engine import check_content_key
    from warehouse import training as warehouse

    check_stage_inputs(config, stage)
    run_id = run_id or new_run_id()
    out = stage_dir(config, stage).resolve()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    spool = warehouse_spool(config, stage)
    with stage_lock(out) if rank0 else nullcontext():
        if fresh and rank0 and out.exists():
            shutil.rmtree(out)
        if rank0:
            warehouse.record_stage_start(
                run_id, stage, config, corpus_digest(config, stage), box_table_fingerprint(config), spool
            )
        try:
            if rank0:  # checkpoints made from other inputs are refused before anything is loaded
                check_content_key(out / "checkpoints", content_key(config, stage), stage)
            summary = _train_stage(config, stage, run_id, out, spool if rank0 else None, progress)
        except BaseException as exc:
            if rank0:
                warehouse.record_stage_failed(run_id, stage, f"{type(exc).__name__}: {exc}", spool)
            raise
        if rank0:
            warehouse.record_stage_end(run_id, stage, summary, spool)
    return summary


def _train_stage(config: Config, stage: str, run_id: str, out: Path, spool: Path | None, progress: bool) -> dict:
    """Build the model and data, train the stage, write its outputs; the summary (rank 0) or {}."""
    import torch

    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor
    from mgllava.train.data import Collate, ConversationDataset, cache_image_features, load_conversations
    from mgllava.train.engine import fault_point, run_stage
    from warehouse import training as warehouse

    records, report = load_conversations(getattr(config.data, f"{stage}_json"), config.data.allow_absolute_image_paths)
    boxes = load_boxes(config.data.boxes_dir)

    torch.manual_seed(config.train.seed)
    model = MGLLaVAForConditionalGeneration.from_config(config.model)
    if stage == "finetune":
        model.load_weights(
            stage_dir(config, "pretrain") / "trainable.safetensors", expected=set(model.projector_state_dict())
        )
    model.set_stage(stage)
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    log.info("%s: trainable parameters\n%s", stage, model.trainable_summary())
    processor = MGLLaVAProcessor.from_config(config.model)
    dataset = ConversationDataset(records, config.data.image_root, boxes, processor,
                                  config.data.allow_absolute_image_paths, config.detector.max_image_pixels)
    if config.data.cache_image_features:
        cache_image_features(dataset, model.encode_frozen, progress=progress)

    def record_metrics(rows) -> None:
        step = rows[-1].step
        warehouse.insert_train_steps(run_id, stage, rows, spool, before_commit=lambda: fault_point("warehouse", step))

    result = run_stage(
        model,
        dataset,
        Collate(processor, config.data.pad_to_multiple_of),
        getattr(config.train, stage),
        stage,
        out / "checkpoints",
        seed=config.train.seed,
        num_workers=config.data.num_workers,
        on_metrics=record_metrics,
        progress=progress,
        keep_checkpoints=config.train.keep_checkpoints,
        deepspeed_overrides=load_user_deepspeed_config(config.train.deepspeed_config),
        lengths=modality_lengths(records) if getattr(config.train, stage).group_by_length else None,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    weights = model.save_trainable(out / "trainable.safetensors")
    export = model.export(out / "export", processor, box_table=config.data.boxes_dir) if stage == "finetune" else None
    summary = {
        "run_id": run_id,
        "stage": stage,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "checkpoint_dir": str(result.checkpoint_dir),
        "trainable_weights": str(weights),
        "export_dir": str(export) if export else None,
        "records": report.records,
        "rejected_records": dict(report.rejected),
        "skipped_samples": dict(result.skipped),
        "images_without_boxes": len(dataset.keys_without_boxes),
        "final_loss": result.final_loss,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    return summary
