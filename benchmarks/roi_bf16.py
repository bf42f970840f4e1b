"""Object pooling with bfloat16 stage maps vs float32, at full-size shapes, on the CPU.

The four ConvNeXt-Large stage maps of one 768 px image (192/384/768/1536 channels on
192/96/48/24 grids; random GELU-shaped activations with per-channel scales), 16 random boxes,
RoIAlign 56x56, :func:`mgllava.model.object_features.pool_object_features` with ``direct`` and
``lean``. For each method: the largest relative L2 error of a box vector pooled from bf16 maps
(as bf16 training pools them) against the float32 reference, the same for the float32 result
merely rounded to bf16 (the floor), the smallest cosine, and the seconds of each. The last line
of the output is one JSON object with the figures.

    python benchmarks/roi_bf16.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def worst_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest relative L2 error of a row of ``x`` against the same row of ``reference``."""
    return ((x - reference).norm(dim=1) / reference.norm(dim=1)).max().item()


def main() -> int:
    from mgllava.model import pool_object_features

    torch.manual_seed(0)
    side, roi, n_boxes = 768, 56, 16
    maps = [F.gelu(torch.randn(1, c, g, g)) * torch.rand(1, c, 1, 1) * 4
            for c, g in zip((192, 384, 768, 1536), (192, 96, 48, 24), strict=True)]
    corner = torch.rand(n_boxes, 2) * side * 0.8
    boxes = [torch.cat([corner, (corner + 8 + torch.rand(n_boxes, 2) * side * 0.4).clamp(max=side)], 1)]
    figures = {"benchmark": "roi_bf16", "high_res": side, "roi": roi, "boxes": n_boxes}
    for method in ("direct", "lean"):
        started = time.perf_counter()
        reference = pool_object_features(maps, boxes, side, roi, method)[0]  # (K, 2880)
        fp32_s = time.perf_counter() - started
        started = time.perf_counter()
        low = pool_object_features([m.bfloat16() for m in maps], boxes, side, roi, method)[0].float()
        bf16_s = time.perf_counter() - started

        figures[method] = {
            "max_rel_error_bf16_maps": round(worst_error(low, reference), 6),
            "max_rel_error_rounding_floor": round(worst_error(reference.bfloat16().float(), reference), 6),
            "min_cosine": round(F.cosine_similarity(low, reference, dim=1).min().item(), 7),
            "fp32_s": round(fp32_s, 2), "bf16_s": round(bf16_s, 2),
        }
        print(f"{method}: {figures[method]}", flush=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
