"""Training data: LLaVA conversation JSON + image root + the Parquet box tables.

- :func:`load_conversations` reads a LLaVA JSON list and rejects, with a count per
  reason, records that cannot train anything (no assistant turn, empty text, bad
  roles, malformed entries, an ``image`` that :func:`detector.keys.normalize_key`
  refuses: not a string, absolute, leaving the image root), so
  ``kept + rejected = records``; a kept record's ``image`` is its normalised key.
- :class:`ConversationDataset` joins each record's image with its boxes (by the
  image key, the path relative to the image root, normalised as detection does),
  runs the model's processor (preprocessing, box mapping, chat template, loss
  masking, truncation) and, for an image that detection would reject (the shared
  loader :func:`detector.images.decode_image`: missing, corrupt, over
  ``detector.max_image_pixels``, a link out of the root...), returns a :class:`Skipped`
  marker with detection's reason instead of raising, so a DataLoader worker never
  crashes the run.
- :func:`cache_image_features` encodes each image once with the frozen encoders
  and hands the features to the dataset, which then returns them instead of
  pixels (``data.cache_image_features``: for corpora that fit in memory).
- :class:`Collate` pads a micro-batch, drops the skipped samples and reports them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from detector.images import Rejected, decode_image
from detector.keys import KeyRefused, normalize_key, resolve_key
from mgllava.model.boxes import Boxes
from mgllava.model.processing_mgllava import MGLLaVAProcessor
from mgllava.model.vision import FrozenImageFeatures
from mgllava.templates import ASSISTANT, HUMAN, IMAGE_PLACEHOLDER, llava_turns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be loaded: its image key and why."""

    key: str
    reason: str  # one of detector.schema.REJECT_REASONS: missing, unreadable, too_large, path_escapes_root...


@dataclass
class LoadReport:
    records: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items())) or "none"
        return f"{self.records} records: {self.kept} kept, {sum(self.rejected.values())} rejected ({reasons})"


def _check_record(record) -> str | None:
    """The reason a record cannot train anything, or None if it is usable. The turns are judged as
    training sees them (:func:`~mgllava.templates.llava_turns`): leading assistant turns, which the
    reference drops, and a trailing human turn without an answer are no fault."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return "malformed_record"
    raw = record["conversations"]
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in raw):
        return "malformed_turn"
    if any(t.get("from") not in (HUMAN, ASSISTANT) for t in raw):
        return "unknown_role"
    turns = llava_turns([(t["from"], t["value"]) for t in raw])
    if not any(role == ASSISTANT for role, _ in turns):
        return "no_assistant_turn"
    if any(not text.replace(IMAGE_PLACEHOLDER, "").strip() for role, text in turns if role == ASSISTANT):
        return "empty_text"
    if any(role != (HUMAN, ASSISTANT)[index % 2] for index, (role, _) in enumerate(turns)):
        return "roles_do_not_alternate"
    n_images = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if n_images != (1 if record.get("image") else 0):
        return "image_placeholder_mismatch"
    return None


def read_corpus(path: str | Path) -> list:
    """The JSON list of a LLaVA conversation file (its records unchecked)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"conversation file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: a LLaVA conversation file holds a JSON list, got {type(records).__name__}")
    return records


def prepare_record(record, allow_absolute: bool = False) -> tuple[dict | None, str | None, str | None]:
    """``(record with its image key normalised, None, None)`` for a usable record, else
    ``(None, reason, detail)``; ``detail`` (the refused image value) may be None."""
    image = record.get("image") if isinstance(record, dict) else None
    key = None if image is None else normalize_key(image, allow_absolute)
    if isinstance(key, KeyRefused):
        return None, key.reason, key.detail
    reason = _check_record(record)
    if reason:
        return None, reason, None
    return (record if key is None else {**record, "image": key}), None, None


def load_conversations(path: str | Path, allow_absolute: bool = False) -> tuple[list[dict], LoadReport]:
    """Read a LLaVA JSON file; return the usable records (``image`` normalised) and the tally of the
    rest. ``allow_absolute``: accept absolute image paths (``data.allow_absolute_image_paths``)."""
    path = Path(path)
    records = read_corpus(path)
    report = LoadReport(records=len(records))
    kept = []
    for index, record in enumerate(records):
        usable, reason, detail = prepare_record(record, allow_absolute)
        if reason:
            report.rejected[reason] += 1
            if detail:
                log.warning("%s: record %s rejected: %s", path.name, record.get("id", f"#{index}"), detail)
        else:
            kept.append(usable)
    report.kept = len(kept)
    log.info("%s: %s", path.name, report.summary())
    return kept, report


class ConversationDataset(torch.utils.data.Dataset):
    """The records' samples; ``allow_absolute_image_paths`` and ``max_image_pixels`` are the
    ``data.*`` settings of the same names (detection applies the same ones)."""

    def __init__(
        self,
        records: list[dict],
        image_root: str | Path,
        boxes: Mapping[str, Boxes],
        processor: MGLLaVAProcessor,
        allow_absolute_image_paths: bool = False,
        max_image_pixels: int = 50_000_000,
    ):
        self.records = records
        self.image_root = Path(image_root)
        self.boxes = boxes
        self.processor = processor
        self.allow_absolute = allow_absolute_image_paths
        self.max_image_pixels = max_image_pixels
        # each record's image key (None: text-only; KeyRefused: skipped with its reason)
        self.keys = [None if r.get("image") is None else normalize_key(r["image"], self.allow_absolute)
                     for r in records]
        keys = set(self.image_keys())
        self.keys_without_boxes = sorted(keys - set(boxes))
        if self.keys_without_boxes:
            log.warning(
                "%d of %d images have no row in the box tables: each gets one all-zero box (one object token)",
                len(self.keys_without_boxes),
                len(keys),
            )

        self.image_features: dict[str, FrozenImageFeatures | Skipped] | None = None  # see cache_image_features

    def image_keys(self) -> list[str]:
        """The distinct usable image keys, sorted."""
        return sorted({k for k in self.keys if isinstance(k, str)})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | Skipped:
        record = self.records[index]
        turns = [(t["from"], t["value"]) for t in record["conversations"]]
        key = self.keys[index]
        if key is None:
            return self.processor(turns)
        if isinstance(key, KeyRefused):
            log.warning("skipping sample %s: %s", record.get("id", f"#{index}"), key.detail)
            return Skipped(key.key, key.reason)
        if self.image_features is not None:
            cached = self.image_features[key]
            return cached if isinstance(cached, Skipped) else self.processor.with_image_features(turns, [cached])
        image = self.load_image(key, record.get("id"))
        return image if isinstance(image, Skipped) else self.processor(turns, [image], [self.boxes.get(key)])

    def load_image(self, key: str, sample_id: str | None = None) -> Image.Image | Skipped:
        """The RGB image under the normalised ``key``, or why it cannot be used (logged): the
        reasons and limits of detection's loader."""
        path = resolve_key(self.image_root, key, self.allow_absolute)
        if isinstance(path, KeyRefused):
            loaded = Rejected(key, "", path.reason, path.detail)
        else:
            loaded = decode_image(key, str(path), self.max_image_pixels)
        if isinstance(loaded, Rejected):
            log.warning("skipping sample %s: image %s: %s (%s)", sample_id or key, key, loaded.reason,
                        loaded.detail)
            return Skipped(key, loaded.reason)
        return loaded.image


def cache_image_features(
    dataset: ConversationDataset,
    encode: Callable[[torch.Tensor, list[torch.Tensor]], FrozenImageFeatures],
    batch_size: int = 16,
    progress: bool = True,
) -> None:
    """Encode every image of ``dataset`` once with ``encode`` (:meth:`MGLLaVA.encode_frozen`) and let the
    dataset return those features from now on. An unreadable image is logged once and stays a
    :class:`Skipped` for each of its samples, so the counts are the same as without the cache."""
    from tqdm import tqdm

    keys = dataset.image_keys()
    features: dict[str, FrozenImageFeatures | Skipped] = {}
    for start in tqdm(range(0, len(keys), batch_size), desc="encoding images", unit="batch", disable=not progress):
        readable, pixel_values, boxes = [], [], []
        for key in keys[start : start + batch_size]:
            image = dataset.load_image(key)
            if isinstance(image, Skipped):
                features[key] = image
                continue
            pixels, mapped = dataset.processor.process_image(image, dataset.boxes.get(key))
            readable.append(key)
            pixel_values.append(pixels)
            boxes.append(mapped)
        if readable:
            encoded = encode(torch.stack(pixel_values), boxes).to("cpu").unbind()
            features.update(zip(readable, encoded))
    total = sum(f.nbytes for f in features.values() if isinstance(f, FrozenImageFeatures))
    log.info("cached the frozen features of %d images (%.1f MB)", len(keys), total / 2**20)
    dataset.image_features = features


class Collate:
    """Pads the loaded samples of a micro-batch; reports the skipped ones under ``skipped``.

    The rows are padded on the right and the batch carries no ``attention_mask``: under causal
    attention a real token never sees a later position, so right padding needs no mask, and the
    padding carries no labels. Without a mask, SDPA and FlashAttention run their causal kernels,
    which skip the masked half of each score matrix instead of computing it and masking it out.

    ``pad_to_multiple_of`` rounds each batch's length up (``data.pad_to_multiple_of``): fewer distinct
    shapes, so kernels chosen and memory allocated for one batch serve the next.
    """

    def __init__(self, processor: MGLLaVAProcessor, pad_to_multiple_of: int = 1):
        self.processor = processor
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict | Skipped]) -> dict:
        samples = [item for item in items if not isinstance(item, Skipped)]
        skipped = [item for item in items if isinstance(item, Skipped)]
        if not samples:
            return {"input_ids": torch.zeros(0, 0, dtype=torch.long), "skipped": skipped, "n_tokens": 0}
        batch = self.processor.collate(samples, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        batch["skipped"] = skipped
        batch["n_tokens"] = int(batch.pop("attention_mask").sum())
        return batch
