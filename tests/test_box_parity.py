"""Box handling as the published MG-LLaVA's dataset and model do it (issue 17, item 2).

The expected values are worked out by hand from the reference (``mg_llava/module/mg_llava_dataset.py``
and ``mg_llava/dataset/utils.py``): boxes shifted by the square padding, scaled by 768 / side,
rounded with ``torch.round`` (half to even) and clipped; more than 100 boxes after the class-aware
NMS keep the top 20 of each category, grouped by category in the order of each category's best
box; a text within 50 tokens of its budget keeps one box per category; an image without boxes
gets one all-zero box; RoIAlign runs with ``aligned=False``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from mgllava.config import load_config
from mgllava.model import (
    IGNORE_INDEX,
    OBJECT_TOKEN_INDEX,
    Boxes,
    MGLLaVAForConditionalGeneration,
    MGLLaVAProcessor,
    filter_boxes,
    pool_object_features,
    prepare_boxes,
)
from mgllava.model.boxes import map_boxes_to_frame


@pytest.mark.parametrize(
    ("box", "width", "height", "expected"),
    [
        # landscape 640 x 480: 80 px padding on top, scale 1.2; (12.48, 120.72, 360.24, 661.08) rounded
        ((10.4, 20.6, 300.2, 470.9), 640, 480, [12, 121, 360, 661]),
        ((0, 0, 640, 480), 640, 480, [0, 96, 768, 672]),
        # portrait 300 x 500: 100 px padding on the left, scale 1.536; (153.6, 0, 614.4, 768) rounded
        ((0, 0, 300, 500), 300, 500, [154, 0, 614, 768]),
        # square 512: scale 1.5, (1.5, 4.5, 7.5, 10.5) rounds half to even
        ((1, 3, 5, 7), 512, 512, [2, 4, 8, 10]),
        # odd padding 101 x 50: 25 px on top (floor of 51 / 2), scale 768 / 101
        ((0, 0, 101, 50), 101, 50, [0, 190, 768, 570]),
        # a box rounded to zero width stays (the reference drops only boxes outside the frame)
        ((10.0, 10.0, 10.2, 20.0), 768, 768, [10, 10, 10, 20]),
    ],
)
def test_boxes_map_to_whole_pixels_of_the_padded_768_frame(box, width, height, expected):
    mapped = prepare_boxes(Boxes(torch.tensor([box], dtype=torch.float32)), width, height, 768, 0.2, 100, 20)
    assert mapped.tolist() == [expected]


def test_boxes_outside_the_frame_are_dropped_and_an_image_without_boxes_gets_one_zero_box():
    outside = torch.tensor([[700.0, 10.0, 760.0, 20.0]])  # right of a 640 x 480 image's padded square
    assert len(map_boxes_to_frame(outside, 600, 600, 768)) == 0
    for boxes in (None, Boxes.empty(), Boxes(outside)):
        assert prepare_boxes(boxes, 600, 600, 768, 0.2, 100, 20).tolist() == [[0, 0, 0, 0]]


def _grid(labels: list[str]) -> Boxes:
    """Disjoint 10 x 10 boxes (no NMS interaction), scores decreasing with the index."""
    n = len(labels)
    xy = torch.stack([torch.arange(n) % 20 * 20, torch.arange(n) // 20 * 20], dim=1).float()
    return Boxes(torch.cat([xy, xy + 10], dim=1), labels, 1.0 - torch.arange(n) / 200)


def _indices(kept: Boxes, boxes: Boxes) -> list[int]:
    return [int((boxes.xyxy == row).all(dim=1).nonzero()) for row in kept.xyxy]


def test_more_than_100_boxes_keep_the_top_20_per_category_grouped_by_category():
    # 110 boxes by decreasing score: dog, cat, car, dog, cat, car... (30 each), then 20 more cats
    labels = [("dog", "cat", "car")[j % 3] for j in range(90)] + ["cat"] * 20
    boxes = _grid(labels)
    kept = filter_boxes(boxes, nms_iou=0.2, cap_threshold=100, per_category=20)
    assert kept.labels == ["dog"] * 20 + ["cat"] * 20 + ["car"] * 20
    assert _indices(kept, boxes) == list(range(0, 60, 3)) + list(range(1, 60, 3)) + list(range(2, 60, 3))
    # at most 100 boxes: no cap, the NMS order (by decreasing score) stays
    hundred = _grid(labels[:100])
    assert _indices(filter_boxes(hundred, 0.2, 100, 20), hundred) == list(range(100))


def test_one_box_per_category_near_the_maximum_length():
    boxes = _grid(["cat", "dog", "cat", "car", "dog"])
    kept = filter_boxes(boxes, 0.2, 100, 20, one_per_category=True)
    assert kept.labels == ["cat", "dog", "car"] and _indices(kept, boxes) == [0, 1, 3]


@pytest.mark.parametrize("method", ["direct", "lean"])
def test_zero_box_pools_the_corner_feature_cell_with_unaligned_roi_align(method):
    """With ``aligned=False`` a box is at least one feature cell: the zero box pools the top-left cell,
    as the 4 x 4 px box (one stage-1 cell of a 256 frame) does."""
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(1, c, 256 // s, 256 // s, generator=generator) for c, s in ((2, 4), (3, 8), (4, 16), (5, 32))]
    (zero,) = pool_object_features(maps, [torch.zeros(1, 4)], 256, 7, method, aligned=False)
    (cell,) = pool_object_features(maps, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], 256, 7, method, aligned=False)
    assert zero.shape == (1, 14) and torch.isfinite(zero).all()
    torch.testing.assert_close(zero, cell)
    (aligned,) = pool_object_features(maps, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], 256, 7, method, aligned=True)
    assert not torch.allclose(aligned, cell)


# --------------------------------------------------------------------------- through the processor and model


@pytest.fixture(scope="module")
def parity_config(tiny_world, tiny_zoo):
    config = load_config(overrides=tiny_overrides(tiny_world, tiny_zoo, tiny_world.parent / "parity"))
    assert config.model.roi_aligned and config.model.object_tokens_in_max_length  # the tiny preset's choice
    config.model.roi_aligned = config.model.object_tokens_in_max_length = False  # the reference's
    return config.model


@pytest.fixture(scope="module")
def parity_model(parity_config):
    torch.manual_seed(0)
    return MGLLaVAForConditionalGeneration.from_config(parity_config).eval()


@pytest.fixture(scope="module")
def processor(parity_config):
    return MGLLaVAProcessor.from_config(parity_config)


IMAGE = Image.new("RGB", (320, 200), (120, 40, 200))
BOXES = Boxes(  # 3 categories, 2 boxes each, in a 320 x 200 image
    torch.tensor([[10, 10, 60, 60], [100, 20, 150, 90], [200, 100, 260, 190],
                  [20, 120, 80, 180], [160, 110, 190, 150], [250, 10, 310, 60]], dtype=torch.float32),
    ["cat", "dog", "car", "cat", "dog", "car"],
    torch.tensor([0.9, 0.85, 0.8, 0.7, 0.6, 0.5]),
)


def _turns(answer_words: int) -> list[tuple[str, str]]:
    return [("human", "<image>\nDescribe the picture."), ("gpt", " ".join(["red square"] * answer_words))]


def _text_length(record: dict) -> int:
    """Tokens of the record's text before the expansion: the placeholders of each image count as one."""
    ids = record["input_ids"]
    return int((ids >= 0).sum()) + len(record["boxes"] or record.get("image_features", []))


def test_text_near_its_budget_keeps_one_box_per_category(processor):
    short = processor(_turns(3), [IMAGE], [BOXES])
    assert _text_length(short) < processor.max_text_length - 50 and len(short["boxes"][0]) == 6
    long = processor(_turns(400), [IMAGE], [BOXES])
    assert _text_length(long) == processor.max_text_length
    assert len(long["boxes"][0]) == 3  # the best cat, dog and car, in that order
    torch.testing.assert_close(long["boxes"][0], short["boxes"][0][:3])


def test_an_image_without_boxes_gets_one_object_token(parity_model, processor):
    record = processor(_turns(3), [IMAGE], [None])
    assert record["boxes"][0].tolist() == [[0, 0, 0, 0]]
    n_image_tokens = parity_model.config.max_length - processor.max_text_length
    assert n_image_tokens == processor.image_seq_length
    assert int((record["input_ids"] == OBJECT_TOKEN_INDEX).sum()) == 1
    assert len(record["input_ids"]) == _text_length(record) - 1 + n_image_tokens + 1
    with torch.no_grad():
        assert torch.isfinite(parity_model(**processor.collate([record])).loss)


@pytest.mark.parametrize("fit", [False, True])
def test_a_long_sample_keeps_its_answer_tokens_through_the_splice(parity_model, processor, fit):
    """The reference cuts the text to max_length - image tokens and splices the object tokens on top;
    with ``object_tokens_in_max_length`` the text is cut by the object tokens too, so the sequence fits
    ``max_length``. Either way every loss-carrying token of the processed text survives the splice."""
    processor.object_tokens_in_max_length = fit
    try:
        record = processor(_turns(400), [IMAGE], [BOXES])
        text_ids, text_labels = processor._fit_object_tokens(*processor._tokenize_record(_turns(400), 1), [3])
    finally:
        processor.object_tokens_in_max_length = False
    n_objects = len(record["boxes"][0])
    assert n_objects == 3
    assert _text_length(record) == len(text_ids) == processor.max_text_length - (n_objects if fit else 0)
    max_length = parity_model.config.max_length
    # the placeholder token gives way to the image and object tokens
    assert len(record["input_ids"]) == max_length - 1 + (0 if fit else n_objects)
    labels = record["labels"]
    assert torch.equal(labels[labels != IGNORE_INDEX], text_labels[text_labels != IGNORE_INDEX])


def test_roi_aligned_setting_reaches_the_object_features(parity_model, processor):
    pixel_values, boxes = processor.process_image(IMAGE, BOXES)
    unaligned = parity_model.encode_frozen(pixel_values[None], [boxes]).box_features[0]
    parity_model.config.roi_aligned = True
    try:
        aligned = parity_model.encode_frozen(pixel_values[None], [boxes]).box_features[0]
    finally:
        parity_model.config.roi_aligned = False
    expected = pool_object_features(
        parity_model.high_res_encoder(pixel_values[None]), [boxes], 256, parity_model.config.roi_output,
        parity_model.config.object_features, aligned=False,
    )[0]
    torch.testing.assert_close(unaligned, expected)
    assert not torch.allclose(aligned, unaligned)


def test_cached_image_features_fit_the_object_tokens_too(parity_model, processor):
    """Training from cached frozen features (data.cache_image_features) cuts the text by the cached
    boxes' count as the image path does."""
    pixel_values, boxes = processor.process_image(IMAGE, BOXES)
    features = parity_model.encode_frozen(pixel_values[None], [boxes])
    processor.object_tokens_in_max_length = True
    try:
        record = processor.with_image_features(_turns(400), [features])
    finally:
        processor.object_tokens_in_max_length = False
    assert _text_length({**record, "boxes": []}) == processor.max_text_length - len(BOXES)
    assert _text_length({**processor.with_image_features(_turns(400), [features]), "boxes": []}) == \
        processor.max_text_length
