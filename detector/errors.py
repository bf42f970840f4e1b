"""Exceptions of the detection stage (no heavy imports)."""

from __future__ import annotations


class DetectorError(RuntimeError):
    """A detector that cannot be built or used as asked (bad weights, prompts without embeddings...)."""


class DetectorQualityError(RuntimeError):
    """A trained detector that missed the required quality (mAP50 below ``min_map50``)."""

    def __init__(self, message: str, metrics: dict):
        super().__init__(message)
        self.metrics = metrics


class RunConflictError(RuntimeError):
    """The output directory holds a box table of a different run (other inputs or detector), or another
    run is writing it now (its lock is held)."""


class BoxTableError(ValueError):
    """A box table that cannot be trusted: unfinished, or a shard whose bytes differ from its recorded checksum."""
