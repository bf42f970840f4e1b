"""``mgllava train --stage pretrain|finetune``: one stage of the recipe, end to end.

Loads and checks the configuration, the conversations and the box tables, builds
MG-LLaVA in the stage's trainable set-up (finetune starts from pretrain's weights),
runs :func:`mgllava.train.engine.run_stage`, writes the stage's outputs and records
metrics, skip tallies and the stage's result in the DuckDB warehouse.

Outputs under ``train.output_dir/<stage>/``::

    checkpoints/                 DeepSpeed checkpoints (resume from here)
    trainable.safetensors        the stage's trainable weights
    export/                      (finetune) the self-contained model directory
    result.json                  paths, steps, load report and skip tallies
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

from mgllava.config import Config, ConfigError
from mgllava.train.schedule import gradient_accumulation

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def stage_dir(config: Config, stage: str) -> Path:
    return Path(config.train.output_dir) / stage


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
    if stage == "finetune" and not (stage_dir(config, "pretrain") / "trainable.safetensors").exists():
        raise ConfigError(
            f"finetune starts from the pretrain stage's weights, but "
            f"{stage_dir(config, 'pretrain') / 'trainable.safetensors'} does not exist: run the pretrain stage first"
        )


def load_boxes(boxes_dir: str | Path) -> dict:
    """Image key -> :class:`Boxes` from the Parquet box tables; empty (with a warning) if there are none."""
    from detector.tables import read_box_index
    from mgllava.model.boxes import Boxes

    boxes_dir = Path(boxes_dir)
    if not (boxes_dir / "boxes").exists():
        if any(boxes_dir.glob("part-*.parquet")):  # the boxes/ folder itself: training would silently see no boxes
            raise ConfigError(f"data.boxes_dir={boxes_dir} holds the Parquet parts themselves; "
                             f"it should be the detect output directory above them: {boxes_dir.parent}")
        log.warning("no box tables at %s: every image gets zero object tokens", boxes_dir)
        return {}
    by_key, _ = read_box_index(boxes_dir)
    return {key: Boxes.from_detections(detections) for key, detections in by_key.items()}


def train(config: Config, stage: str, run_id: str | None = None, fresh: bool = False, progress: bool = True) -> dict:
    """Run one stage (resuming from its last checkpoint unless ``fresh``); return its result."""
    import shutil

    import torch

    from mgllava.model import MGLLaVA, MGLLaVAProcessor
    from mgllava.train.data import Collate, ConversationDataset, cache_image_features, load_conversations
    from mgllava.train.engine import run_stage
    from warehouse import training as warehouse

    check_stage_inputs(config, stage)
    run_id = run_id or new_run_id()
    out = stage_dir(config, stage).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    records, report = load_conversations(getattr(config.data, f"{stage}_json"))
    boxes = load_boxes(config.data.boxes_dir)

    torch.manual_seed(config.train.seed)
    model = MGLLaVA.from_config(config.model)
    if stage == "finetune":
        model.load_weights(
            stage_dir(config, "pretrain") / "trainable.safetensors", expected=set(model.projector_state_dict())
        )
    model.set_stage(stage)
    log.info("%s: trainable parameters\n%s", stage, model.trainable_summary())
    processor = MGLLaVAProcessor.from_config(config.model, tokenizer=model.processor.tokenizer)
    dataset = ConversationDataset(records, config.data.image_root, boxes, processor)
    if config.data.cache_image_features:
        cache_image_features(dataset, model.encode_frozen, progress=progress)

    def record_metrics(rows) -> None:
        warehouse.insert_train_steps(run_id, stage, rows)

    from mgllava.pipeline import box_table_fingerprint, corpus_digest

    warehouse.record_stage_start(
        run_id, stage, config, corpus_digest(config, stage), box_table_fingerprint(config)
    )
    result = run_stage(
        model,
        dataset,
        Collate(processor),
        getattr(config.train, stage),
        stage,
        out / "checkpoints",
        seed=config.train.seed,
        num_workers=config.data.num_workers,
        on_metrics=record_metrics,
        progress=progress,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    weights = model.save_trainable(out / "trainable.safetensors")
    export = model.export(out / "export") if stage == "finetune" else None
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
        "final_loss": result.metrics[-1].loss if result.metrics else None,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    warehouse.record_stage_end(run_id, stage, summary)
    return summary
