"""Model building blocks on synthetic tensors: fusion, boxes, object features (the splice: test_hf_model.py)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mgllava.model import (
    Boxes,
    ConvGateFusion,
    filter_boxes,
    image_to_pixel_values,
    map_boxes_to_frame,
    pool_object_features,
    prepare_boxes,
)
from mgllava.shapes.zoo import CLIP_MEAN, CLIP_STD

# --------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("high_side", [8, 4])  # same grid as the tokens, and a coarser one (resized)
def test_fusion_is_identity_at_init(high_side):
    torch.manual_seed(0)
    fusion = ConvGateFusion(low_dim=32, high_dim=48)
    low = torch.randn(2, 64, 32)  # (B, N = 8 x 8, d)
    high = torch.randn(2, 48, high_side, high_side)
    out = fusion(low, high)
    assert out.shape == (2, 64, 32)
    assert torch.equal(out, low)


def test_fusion_initialisation():
    fusion = ConvGateFusion(low_dim=32, high_dim=48)
    for conv in (fusion.proj_h, fusion.proj_l):
        assert not conv.weight.any() and not conv.bias.any()
    for conv in (fusion.conv1x1_h, fusion.dwconv7x7):
        assert conv.weight.any() and not conv.bias.any()
    assert fusion.dwconv7x7.groups == 32 and fusion.dwconv7x7.padding == (3, 3)


def test_fusion_gradients_reach_parameters():
    torch.manual_seed(0)
    fusion = ConvGateFusion(low_dim=32, high_dim=48)
    low, high = torch.randn(2, 64, 32), torch.randn(2, 48, 8, 8)
    fusion(low, high).square().sum().backward()
    # at init only the zero projections get a gradient (everything behind them is multiplied by 0)
    assert fusion.proj_h.weight.grad.abs().sum() > 0
    assert fusion.proj_l.weight.grad.abs().sum() > 0
    # once they are non-zero, every parameter does
    fusion.zero_grad()
    with torch.no_grad():
        for conv in (fusion.proj_h, fusion.proj_l):
            conv.weight.normal_(std=0.1)
    fusion(low, high).square().sum().backward()
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- boxes


def test_class_aware_nms():
    boxes = Boxes(
        torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]]),
        ["cat", "cat", "dog", "cat"],
        torch.tensor([0.9, 0.8, 0.7, 0.6]),
    )
    kept = filter_boxes(boxes, nms_iou=0.2, cap_threshold=100, per_category=20)
    # the second cat overlaps the first (IoU 0.68); the dog box overlaps too but is another class
    assert kept.labels == ["cat", "dog", "cat"]
    assert torch.equal(kept.scores, torch.tensor([0.9, 0.7, 0.6]))


def _grid_boxes(n: int, labels: list[str]) -> Boxes:
    """n disjoint 10 x 10 boxes (no NMS interaction), scores decreasing with the index."""
    xy = torch.stack([torch.arange(n) % 20 * 20, torch.arange(n) // 20 * 20], dim=1).float()
    return Boxes(torch.cat([xy, xy + 10], dim=1), labels, torch.linspace(1.0, 0.1, n))


def test_category_cap_applies_only_above_threshold():
    boxes = _grid_boxes(130, ["a"] * 100 + ["b"] * 30)
    kept = filter_boxes(boxes, nms_iou=0.2, cap_threshold=100, per_category=20)
    assert kept.labels.count("a") == 20 and kept.labels.count("b") == 20
    assert torch.equal(kept.xyxy[:20], boxes.xyxy[:20])  # the best 20 of "a"
    assert torch.equal(kept.xyxy[20:], boxes.xyxy[100:120])  # the best 20 of "b"
    few = _grid_boxes(100, ["a"] * 70 + ["b"] * 30)
    assert len(filter_boxes(few, nms_iou=0.2, cap_threshold=100, per_category=20)) == 100


def test_mapping_pads_scales_clips_and_drops():
    # 400 x 200 image: square side 400, padded 100 px on top; frame 256 -> scale 0.64
    xyxy = torch.tensor(
        [
            [0.0, 0.0, 400.0, 200.0],  # the whole image
            [125.0, 25.0, 175.0, 75.0],
            [-50.0, 150.0, 100.0, 260.0],  # sticks out left and below the image (into the padding)
            [500.0, 0.0, 600.0, 100.0],  # entirely right of the frame: empty after clipping
        ]
    )
    mapped = map_boxes_to_frame(xyxy, width=400, height=200, frame=256)
    expected = torch.tensor([[0, 64, 256, 192], [80, 80, 112, 112], [0, 160, 64, 230]]).float()  # 230.4 rounded
    torch.testing.assert_close(mapped, expected)
    assert prepare_boxes(None, 400, 200, 256, 0.2, 100, 20).tolist() == [[0, 0, 0, 0]]  # one zero box


# --------------------------------------------------------------------------- object features


def test_box_pools_the_pixels_it_covers():
    """End to end on pixels: a box drawn on a non-square image pools that patch's colour."""
    image = Image.new("RGB", (300, 150), (255, 255, 255))
    patch_colour = (200, 30, 90)
    image.paste(Image.new("RGB", (60, 40), patch_colour), (200, 90))  # patch at x 200-260, y 90-130
    pixel_values = image_to_pixel_values(image, 256, CLIP_MEAN, CLIP_STD)[None]  # (1, 3, 256, 256)
    inner = Boxes(torch.tensor([[205.0, 95.0, 255.0, 125.0]]))  # inside the patch, away from resize blur
    mapped = prepare_boxes(inner, 300, 150, 256, 0.2, 100, 20)
    for method in ("direct", "lean"):
        (pooled,) = pool_object_features([pixel_values], [mapped], 256, output_size=7, method=method)
        expected = (torch.tensor(patch_colour) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        torch.testing.assert_close(pooled[0], expected, atol=1e-3, rtol=0)


def _block_stage_maps(high_res: int = 256) -> list[torch.Tensor]:
    """Four stage maps (strides 4..32, 2-5 channels) valued 100 * stage + block id on a 64-px block grid."""
    maps = []
    for stage, (stride, channels) in enumerate(zip((4, 8, 16, 32), (2, 3, 4, 5))):
        side = high_res // stride
        block = torch.arange(side) * stride // 64  # block index of each cell along one axis
        block_id = block[:, None] * 4 + block[None, :]  # (side, side)
        maps.append((100 * stage + block_id).float().expand(1, channels, side, side).clone())
    return maps


@pytest.mark.parametrize("method", ["direct", "lean"])
def test_box_pools_the_stage_features_it_covers(method):
    """Boxes in a non-square image's pixels pool exactly the stage-map block they map onto."""
    maps = _block_stage_maps()
    # 400 x 200 image; (125, 25, 175, 75) maps to (80, 80, 112, 112): inside the 64-px block (1, 1) = id 5;
    # (420, 75, 500, 125) maps to (269, 112, 320, 144), entirely outside the frame: dropped
    boxes = Boxes(
        torch.tensor([[125.0, 25.0, 175.0, 75.0], [0.0, 125.0, 50.0, 175.0], [420.0, 75.0, 500.0, 125.0]])
    )
    mapped = prepare_boxes(boxes, 400, 200, 256, nms_iou=0.2, cap_threshold=100, per_category=20)
    assert len(mapped) == 2  # the third box was outside the image frame
    (pooled,) = pool_object_features(maps, [mapped], 256, output_size=7, method=method)
    assert pooled.shape == (2, 2 + 3 + 4 + 5)
    # the second box maps to (0, 144, 32, 176): block (row 2, column 0) = id 8
    for row, block_id in enumerate((5, 8)):
        expected = torch.cat([torch.full((c,), 100.0 * s + block_id) for s, c in enumerate((2, 3, 4, 5))])
        torch.testing.assert_close(pooled[row], expected)


@pytest.mark.parametrize("method", ["direct", "lean"])
def test_object_features_in_bfloat16(method):
    """bfloat16 maps (GPU training) pool as float32 ones do, returned in bfloat16 (roi_align has no bf16 kernel)."""
    maps = [m + torch.rand_like(m) for m in _block_stage_maps()]
    boxes = [torch.tensor([[80.0, 80.0, 112.0, 112.0], [3.0, 150.0, 35.0, 171.0]])]
    (expected,) = pool_object_features(maps, boxes, 256, output_size=7, method=method)
    (pooled,) = pool_object_features([m.bfloat16() for m in maps], boxes, 256, output_size=7, method=method)
    assert pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled.float(), expected, rtol=1e-2, atol=1e-2)


def test_object_features_with_no_boxes():
    maps = _block_stage_maps()
    pooled = pool_object_features(maps, [torch.zeros(0, 4)], 256, output_size=7)
    assert [p.shape for p in pooled] == [(0, 14)]
