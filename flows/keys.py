"""Cache keys of the ``mgllava`` flow's expensive tasks.

A key is a sha256 over everything the task's output depends on (:mod:`mgllava.lineage`'s
digests of configuration sections, files and model directories). Re-running with the same
inputs hits Prefect's cache (state ``Cached`` in the UI, a log line saying so); a changed
input, or ``fresh``, recomputes. A training stage's key is its content key,
:func:`mgllava.lineage.train_key`, which its checkpoints also record.
"""

from __future__ import annotations

from pathlib import Path

from mgllava.config import Config
from mgllava.lineage import box_table_fingerprint, digest, file_digest, tree_digest


def detector_train_key(config: Config) -> str:
    """The ``detector.train`` settings and the shapes world's manifest beside its YOLO dataset."""
    world_manifest = Path(config.detector.train.data).parent / "world.json"
    return digest("detector-train", config.detector.train.model_dump(), file_digest(world_manifest))


def evaluate_key(config: Config, model_dir: str) -> str:
    """The ``eval`` section, the exported model's files and the box table's run fingerprint."""
    return digest("evaluate", config.eval.model_dump(mode="json"), tree_digest(model_dir),
                  box_table_fingerprint(config))
