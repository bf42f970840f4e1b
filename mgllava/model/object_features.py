"""One feature vector per box, pooled out of the four ConvNeXt stage maps (SPEC section 4).

Boxes are already in the ``high_res x high_res`` input frame (see
:mod:`mgllava.model.boxes`). Two methods, chosen by ``ModelConfig.object_features``:

- ``direct`` (the paper): every stage map is resized bilinearly to the stage-1 grid,
  the maps are concatenated on channels (C_total = sum of stage widths, 2880 at
  full size), and one ``roi_align`` with ``spatial_scale = stage1_side / high_res``
  pools each box; memory grows with C_total x stage1_side^2 per image (0.4 GB fp32
  at full size) plus K x C_total x R^2 for the RoIAlign output;
- ``lean``: ``roi_align`` on each stage map at its own resolution
  (``spatial_scale = stage_side / high_res``), mean-pooled per stage, then
  concatenated; no upsampled map is materialised, and only one stage's
  K x C_s x R^2 RoIAlign output exists at a time.

Both use an R x R RoIAlign (R = ``roi_output``; 56 at full size) with torchvision's
adaptive sampling ratio, then the mean over the R x R cells. ``aligned`` is
``ModelConfig.roi_aligned``: False (the published MG-LLaVA) treats a box as covering
at least one feature cell, so an all-zero box pools the map's corner cell; True maps a
box edge at pixel coordinate x to feature coordinate x * scale - 0.5 (pixel-exact). The
two methods give nearly the same vectors (measured in the tests).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

ObjectFeatureMethod = Literal["direct", "lean"]


def _roi_mean(
    feature_map: torch.Tensor, boxes: list[torch.Tensor], scale: float, output_size: int, aligned: bool
) -> torch.Tensor:
    """Mean RoIAlign cell of each box: (B, C, h, w) and B lists of (K_i, 4) -> (sum K_i, C).

    torchvision's ``roi_align`` has no bfloat16 kernel (CPU or CUDA): a bfloat16 map is
    pooled in float32 and the result returned in bfloat16.
    """
    compute = torch.float32 if feature_map.dtype == torch.bfloat16 else feature_map.dtype
    pooled = roi_align(
        feature_map.to(compute), [b.to(compute) for b in boxes], output_size, spatial_scale=scale, aligned=aligned
    )  # (ΣK, C, R, R)
    return pooled.mean(dim=(2, 3)).to(feature_map.dtype)


def pool_object_features(
    stage_maps: list[torch.Tensor],
    boxes: list[torch.Tensor],
    high_res: int,
    output_size: int,
    method: ObjectFeatureMethod = "direct",
    aligned: bool = True,
) -> list[torch.Tensor]:
    """Pool one C_total-vector per box.

    ``stage_maps``: the 4 maps (B, C_s, h_s, h_s); ``boxes``: B tensors (K_i, 4) in the
    high-res frame. Returns B tensors (K_i, C_total); an image without boxes gets (0, C_total)
    (the model never passes one: :func:`mgllava.model.boxes.prepare_boxes` gives it a zero box).
    ``aligned``: RoIAlign's flag (the model passes ``ModelConfig.roi_aligned``).
    """
    counts = [len(b) for b in boxes]
    total_channels = sum(m.shape[1] for m in stage_maps)
    if sum(counts) == 0:
        return [stage_maps[0].new_zeros(0, total_channels) for _ in boxes]
    boxes = [b.to(device=stage_maps[0].device, dtype=torch.float32) for b in boxes]  # pixel coordinates
    if method == "direct":
        stage1_grid = stage_maps[0].shape[-2:]
        resized = [
            F.interpolate(m, size=stage1_grid, mode="bilinear", align_corners=False) for m in stage_maps[1:]
        ]
        concatenated = torch.cat([stage_maps[0], *resized], dim=1)  # (B, C_total, h_1, h_1)
        del resized  # only the concatenated map stays alive during RoIAlign
        features = _roi_mean(concatenated, boxes, stage1_grid[-1] / high_res, output_size, aligned)
    elif method == "lean":
        features = torch.cat(
            [_roi_mean(m, boxes, m.shape[-1] / high_res, output_size, aligned) for m in stage_maps], dim=1
        )  # (ΣK, C_total)
    else:
        raise ValueError(f"unknown object feature method {method!r}; expected 'direct' or 'lean'")
    return list(features.split(counts))
