"""Detector boxes on the model side: filtering and mapping into the high-res frame.

Boxes arrive as an offline detector wrote them (SPEC section 4): ``(x1, y1, x2, y2)``
in original-image pixels, a category name and a score per box. Before RoIAlign
they go through one pipeline, :func:`prepare_boxes`, used by the processor (in
DataLoader workers) and by ``MGLLaVA.generate`` alike. It does what the published
MG-LLaVA's dataset does:

1. class-aware NMS at IoU ``nms_iou`` (``torchvision.ops.batched_nms``): the boxes by
   decreasing score;
2. if more than ``cap_threshold`` boxes remain, the ``per_category`` highest-scoring
   boxes of each category, grouped by category (categories in the order of their best
   box, each group by decreasing score); when the sample's text is within
   :data:`NEAR_MAX_LENGTH_MARGIN` tokens of its budget, one box per category, grouped
   the same way, whatever the count;
3. the pad-and-scale mapping of :func:`mgllava.model.vision.pad_to_square` into the
   ``frame x frame`` high-res input: add the centring offset, scale by ``frame / side``,
   round to whole pixels (half to even);
4. dropping boxes that lie entirely outside the frame and clipping the rest to it
   (a box left with zero width or height is kept: RoIAlign samples one feature cell);
5. an image left without boxes gets one all-zero box, so every image has at least one
   object token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision.ops import batched_nms


@dataclass
class Boxes:
    """Detections for one image, in original-image pixels."""

    xyxy: torch.Tensor  # (K, 4) float: x1, y1, x2, y2
    labels: list[str] = field(default_factory=list)  # K category names
    scores: torch.Tensor | None = None  # (K,) float; None means all 1.0

    def __post_init__(self) -> None:
        self.xyxy = torch.as_tensor(self.xyxy, dtype=torch.float32).reshape(-1, 4)
        if not self.labels:
            self.labels = ["object"] * len(self.xyxy)
        self.scores = (
            torch.ones(len(self.xyxy))
            if self.scores is None
            else torch.as_tensor(self.scores, dtype=torch.float32).reshape(-1)
        )
        if not len(self.xyxy) == len(self.labels) == len(self.scores):
            raise ValueError(
                f"Boxes: {len(self.xyxy)} boxes, {len(self.labels)} labels and {len(self.scores)} scores"
            )

    def __len__(self) -> int:
        return len(self.xyxy)

    def select(self, index: torch.Tensor) -> Boxes:
        """The boxes at ``index`` (a 1-D index tensor), in that order."""
        index = index.reshape(-1)
        return Boxes(self.xyxy[index], [self.labels[i] for i in index.tolist()], self.scores[index])

    @classmethod
    def empty(cls) -> Boxes:
        return cls(torch.zeros(0, 4))

    @classmethod
    def from_detections(cls, detections: list[tuple[float, float, float, float, float, str]]) -> Boxes:
        """From box-table rows ``(x1, y1, x2, y2, score, label)`` (``detector.tables``)."""
        if not detections:
            return cls.empty()
        return cls([d[:4] for d in detections], [d[5] for d in detections], [d[4] for d in detections])


def square_padding(width: int, height: int) -> tuple[int, int, int]:
    """``(side, left, top)`` of the centred square padding of a ``width x height`` image."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


NEAR_MAX_LENGTH_MARGIN = 50
"""A text this close to its token budget keeps one box per category (as the reference)."""


def filter_boxes(
    boxes: Boxes, nms_iou: float, cap_threshold: int, per_category: int, one_per_category: bool = False
) -> Boxes:
    """Class-aware NMS, then the per-category cap (grouped by category) when more than
    ``cap_threshold`` boxes remain, or one box per category with ``one_per_category``."""
    if len(boxes) == 0:
        return boxes
    names = sorted(set(boxes.labels))
    category = torch.tensor([names.index(label) for label in boxes.labels])  # (K,)
    keep = batched_nms(boxes.xyxy, boxes.scores, category, nms_iou)  # (K',) by decreasing score
    if len(keep) > cap_threshold or one_per_category:
        limit = 1 if one_per_category else per_category
        groups: dict[int, list[int]] = {}  # category -> its boxes; categories in order of their best box
        for index in keep.tolist():
            groups.setdefault(int(category[index]), []).append(index)
        keep = torch.tensor([index for group in groups.values() for index in group[:limit]])
    return boxes.select(keep)


def map_boxes_to_frame(xyxy: torch.Tensor, width: int, height: int, frame: int) -> torch.Tensor:
    """Map (K, 4) original-pixel boxes into the padded, resized ``frame x frame`` input.

    Returns (K', 4) float boxes with whole-pixel coordinates, clipped to the frame; boxes
    entirely outside it are dropped.
    """
    side, left, top = square_padding(width, height)
    offset = torch.tensor([left, top, left, top], dtype=xyxy.dtype)
    mapped = torch.round((xyxy + offset) * (frame / side))  # (K, 4)
    inside = (mapped[:, 2] >= 0) & (mapped[:, 3] >= 0) & (mapped[:, 0] <= frame) & (mapped[:, 1] <= frame)
    return mapped[inside].clamp(0, frame)


def prepare_boxes(
    boxes: Boxes | None,
    width: int,
    height: int,
    frame: int,
    nms_iou: float,
    cap_threshold: int,
    per_category: int,
    one_per_category: bool = False,
) -> torch.Tensor:
    """Filter then map one image's detections: (K, 4) float boxes in the high-res frame, K >= 1
    (an image without boxes gets one all-zero box)."""
    mapped = torch.zeros(0, 4)
    if boxes is not None and len(boxes):
        kept = filter_boxes(boxes, nms_iou, cap_threshold, per_category, one_per_category)
        mapped = map_boxes_to_frame(kept.xyxy, width, height, frame)
    return mapped if len(mapped) else torch.zeros(1, 4)
