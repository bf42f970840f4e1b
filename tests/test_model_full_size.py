"""The full-size vision path (SPEC section 2) with random weights, on one 768 x 768 image."""

from __future__ import annotations

import resource
import time

import pytest
import torch
from PIL import Image

from mgllava.model import (
    Boxes,
    ConvGateFusion,
    MLPProjector,
    downsample,
    image_to_pixel_values,
    pool_object_features,
    prepare_boxes,
    random_full_size_encoders,
)
from mgllava.shapes.zoo import CLIP_MEAN, CLIP_STD


@pytest.mark.slow
def test_full_size_vision_path():
    start = time.perf_counter()
    torch.manual_seed(0)
    low_res_encoder, high_res_encoder = random_full_size_encoders()  # CLIP ViT-L/14-336, ConvNeXt-L-320
    low_res_encoder.eval()
    high_res_encoder.eval()
    assert high_res_encoder.stage_channels == [192, 384, 768, 1536]

    noise = torch.randint(
        0, 256, (640, 1024, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    image = Image.fromarray(noise.numpy())  # non-square: padded to 1024 x 1024
    detections = Boxes(
        torch.tensor(
            [[100.0, 50.0, 400.0, 300.0], [110.0, 60.0, 400.0, 300.0], [500.0, 200.0, 1000.0, 600.0]]
        ),
        ["car", "car", "tree"],
        torch.tensor([0.9, 0.8, 0.7]),
    )
    boxes = prepare_boxes(
        detections, image.width, image.height, 768, nms_iou=0.2, cap_threshold=100, per_category=20
    )
    assert boxes.shape == (2, 4)  # the second car box is suppressed by NMS
    pixel_values = image_to_pixel_values(image, 768, CLIP_MEAN, CLIP_STD)[None]  # (1, 3, 768, 768)

    with torch.no_grad():
        low_tokens = low_res_encoder(downsample(pixel_values, 336))
        stage_maps = high_res_encoder(pixel_values)
        fused = ConvGateFusion(1024, 1536)(low_tokens, stage_maps[-1])
        features = {m: pool_object_features(stage_maps, [boxes], 768, 56, m)[0] for m in ("direct", "lean")}
        object_tokens = MLPProjector(2880, 256)(features["direct"])

    assert low_tokens.shape == (1, 576, 1024)
    assert [tuple(m.shape[1:]) for m in stage_maps] == [
        (192, 192, 192),
        (384, 96, 96),
        (768, 48, 48),
        (1536, 24, 24),
    ]
    assert fused.shape == (1, 576, 1024) and torch.equal(fused, low_tokens)  # identity at init
    assert features["direct"].shape == features["lean"].shape == (2, 2880)
    assert object_tokens.shape == (2, 256)
    relative = (features["direct"] - features["lean"]).norm(dim=1) / features["direct"].norm(dim=1)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    elapsed = time.perf_counter() - start
    print(
        f"\nfull size: direct vs lean relative L2 per box {relative.tolist()}; peak RSS {peak_gb:.2f} GiB; {elapsed:.0f} s"
    )
    assert relative.max() < 0.10
    assert peak_gb < 8
