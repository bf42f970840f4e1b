"""Cache keys of the ``mgllava`` flow's expensive tasks.

A key is a sha256 over everything the task's output depends on (:mod:`mgllava.lineage`'s
digests of configuration sections, files and model directories). Re-running with the same
inputs hits Prefect's cache (state ``Cached`` in the UI, a log line saying so); a changed
input, or ``fresh``, recomputes. A training stage's key is its content key,
:func:`mgllava.lineage.train_key` (which its checkpoints also record), and where it writes; an
evaluation's, the export's files and where they are. A cached result names files in its own output
directory, so the same inputs with another output directory (an ablation variant's, another work
dir) compute there instead of pointing at files elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from mgllava.config import Config
from mgllava.lineage import box_table_fingerprint, digest, file_digest, train_key, tree_digest
from mgllava.train.job import stage_dir


def detector_train_key(config: Config) -> str:
    """The ``detector.train`` settings and the shapes world's manifest beside its YOLO dataset."""
    world_manifest = Path(config.detector.train.data).parent / "world.json"
    return digest("detector-train", config.detector.train.model_dump(), file_digest(world_manifest))


def train_stage_key(config: Config, stage: str) -> str:
    """The stage's content key and its output directory."""
    return digest("train-stage", train_key(config, stage), str(stage_dir(config, stage).resolve()))


def evaluate_key(config: Config, model_dir: str) -> str:
    """The ``eval`` section, the exported model's files and directory, and the box table's run fingerprint
    (the scores are recorded under the export's directory)."""
    return digest("evaluate", config.eval.model_dump(mode="json"), tree_digest(model_dir),
                  str(Path(model_dir).resolve()), box_table_fingerprint(config))
