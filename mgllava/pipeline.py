"""The full-train pipeline's stages as plain functions, and the content keys that cache them.

``flows/full_train.py`` wires these into the Prefect flow ``mgllava``:
world and zoo (embedded default only) -> detector (trained on the shapes world
when none is given) -> detect -> pretrain -> finetune -> evaluate.

A stage's cache key is a sha256 over everything its output depends on: the
relevant configuration sections, the corpus files' bytes, the box table's
run fingerprint, the detector's weights, the upstream checkpoint. Re-running
with the same inputs therefore hits Prefect's cache (state ``Cached`` in the UI,
a log line saying so); a changed input, or ``force``, recomputes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mgllava.config import Config, ConfigError

BIG_FILE = 64 * 2**20  # larger files are keyed by size and mtime instead of content


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (size + mtime for files over 64 MiB); 'missing' if absent."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    stat = path.stat()
    if stat.st_size > BIG_FILE:
        return _digest(str(path), stat.st_size, stat.st_mtime_ns)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(folder: str | Path) -> str:
    """Digest of every file under ``folder`` (a model directory), by :func:`file_digest`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    return _digest([(str(p.relative_to(folder)), file_digest(p)) for p in files])


def _section(config: Config, *fields: str) -> dict:
    return {name: config.get(name) for name in fields}


# --------------------------------------------------------------------------- world and models


def prepare_world_and_zoo(config: Config) -> dict:
    """The shapes world and tiny zoo of the embedded default (:func:`mgllava.shapes.prepare`)."""
    from mgllava.shapes import prepare

    return prepare(config)


def detector_train_key(config: Config) -> str:
    data = Path(config.detector.train.data)
    world_manifest = data.parent / "world.json"
    return _digest("detector-train", config.detector.train.model_dump(), file_digest(world_manifest))


def train_detector(config: Config, progress=None) -> dict:
    """Train the YOLO of ``detector.train`` on the world's YOLO dataset into ``work_dir/detector``;
    ``progress(fraction, message)`` after each epoch."""
    from detector.train import train_detector as train

    settings = config.detector.train
    return train(settings.data, Path(config.work_dir) / "detector", base=settings.base, epochs=settings.epochs,
                 imgsz=settings.imgsz, batch=settings.batch, min_map50=settings.min_map50,
                 device=config.detector.device, progress=progress)


def needs_detector_training(config: Config) -> bool:
    """True when no detector weights exist and ``detector.train.data`` names a YOLO dataset to train one on
    (the tiny preset: the shapes world's labels)."""
    if Path(config.detector.model).exists():
        return False
    if not config.detector.train.data:
        raise ConfigError(
            f"config field 'detector.model': weights not found: {config.detector.model} "
            "(give weights, or detector.train.data to train a detector)"
        )
    return True


# --------------------------------------------------------------------------- training and evaluation


def corpus_digest(config: Config, stage: str) -> str:
    return file_digest(getattr(config.data, f"{stage}_json"))


def box_table_fingerprint(config: Config) -> str:
    manifest = Path(config.data.boxes_dir) / "manifest.json"
    return json.loads(manifest.read_text()).get("fingerprint", "") if manifest.exists() else "none"


def _train_inputs(config: Config, stage: str) -> dict:
    """What a training stage's output depends on, by name (in :func:`train_key`'s order)."""
    upstream = (
        file_digest(Path(config.train.output_dir) / "pretrain" / "trainable.safetensors")
        if stage == "finetune"
        else tree_digest(config.model.llm.path)
    )
    inputs = {
        "model": config.model.model_dump(mode="json"),
        "stage recipe": getattr(config.train, stage).model_dump(mode="json"),
        "seed": config.train.seed,
        "corpus": corpus_digest(config, stage),
        "boxes": box_table_fingerprint(config),
        "upstream weights": upstream,
    }
    if config.train.deepspeed_config:  # only when given: the keys of runs without one stay as they were
        inputs["deepspeed config"] = file_digest(config.train.deepspeed_config)
    return inputs


def train_key(config: Config, stage: str) -> str:
    """Key of a training stage: model, stage recipe, corpus, boxes, starting weights."""
    return _digest("train", stage, *_train_inputs(config, stage).values())


def train_key_parts(config: Config, stage: str) -> dict[str, str]:
    """A digest of each input of :func:`train_key`, by name: what a refused resume names as changed."""
    return {name: _digest(value) for name, value in _train_inputs(config, stage).items()}


def reset_stage(config: Config, stage: str) -> None:
    """Discard a training stage's checkpoints and outputs, so that it starts over."""
    import shutil

    shutil.rmtree(Path(config.train.output_dir) / stage, ignore_errors=True)


def evaluate_key(config: Config, model_dir: str) -> str:
    return _digest(
        "evaluate",
        config.eval.model_dump(mode="json"),
        tree_digest(model_dir),
        box_table_fingerprint(config),
    )
