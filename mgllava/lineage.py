"""Lineage digests: what a stage's output was made from, as sha256 hex strings.

A training stage records its content key (:func:`train_key`: the model and stage recipe, the
corpus file, the box table's run fingerprint, the starting weights) beside its checkpoints and
refuses to resume checkpoints made from other inputs; the warehouse records the corpus digest
and box-table fingerprint with each stage; the flows key their cached tasks on these digests
(``flows/keys.py``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mgllava.config import Config

BIG_FILE = 64 * 2**20  # larger files are keyed by size and mtime instead of content


def digest(*parts) -> str:
    """sha256 of ``parts`` as sorted-key JSON (anything not JSON by its ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (size + mtime for files over 64 MiB); 'missing' if absent."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    stat = path.stat()
    if stat.st_size > BIG_FILE:
        return digest(str(path), stat.st_size, stat.st_mtime_ns)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(folder: str | Path) -> str:
    """Digest of every file under ``folder`` (a model directory), by :func:`file_digest`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    return digest([(str(p.relative_to(folder)), file_digest(p)) for p in files])


def corpus_digest(config: Config, stage: str) -> str:
    """:func:`file_digest` of the stage's corpus (``data.<stage>_json``)."""
    return file_digest(getattr(config.data, f"{stage}_json"))


def box_table_fingerprint(config: Config) -> str:
    """The run fingerprint in ``data.boxes_dir``'s manifest; 'none' without a manifest."""
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
    """Content key of a training stage: model, stage recipe, seed, corpus, boxes, starting weights."""
    return digest("train", stage, *_train_inputs(config, stage).values())


def train_key_parts(config: Config, stage: str) -> dict[str, str]:
    """A digest of each input of :func:`train_key`, by name: what a refused resume names as changed."""
    return {name: digest(value) for name, value in _train_inputs(config, stage).items()}
