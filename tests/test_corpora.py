"""Real corpora as they come: LLaVA-Pretrain and the LLaVA-665k mixture, built here in miniature.

Integer and string ids, text-only (ShareGPT) records, ``<image>`` at the end or in the middle of
the first human turn, a leading assistant turn, images in nested folders in greyscale, CMYK,
palette and EXIF-rotated form, and records whose ``image`` is a list or a number. Images are
read as the reference reads them (``Image.open(path).convert("RGB")``, no EXIF rotation).
"""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from mgllava.train.data import ConversationDataset, Skipped, load_conversations

# key -> (mode, format, size); every image is 48 x 32 as stored
IMAGES = {
    "coco/train2017/000000033471.jpg": ("RGB", "JPEG"),
    "gqa/images/2354786.jpg": ("L", "JPEG"),
    "ocr_vqa/images/0060931698.jpg": ("CMYK", "JPEG"),
    "vg/VG_100K_2/palette.png": ("P", "PNG"),
    "textvqa/train_images/rotated.jpg": ("RGB", "JPEG"),  # EXIF orientation 6: shown rotated 90 degrees
    "00453/004539375.png": ("LA", "PNG"),
}
SIZE = (48, 32)
ROTATED = "textvqa/train_images/rotated.jpg"


def _turns(*pairs):
    return [{"from": role, "value": text} for role, text in pairs]


FINETUNE = [
    {"id": 33471, "image": "coco/train2017/000000033471.jpg",
     "conversations": _turns(("human", "<image>\nWhat is in the picture?"), ("gpt", "A red square."),
                             ("human", "What colour is it?"), ("gpt", "Red."))},
    {"id": "2354786", "image": "gqa/images/2354786.jpg",
     "conversations": _turns(("human", "Is the circle grey?\n<image>"), ("gpt", "Yes."))},
    {"id": "0060931698", "image": "ocr_vqa/images/0060931698.jpg",
     "conversations": _turns(("human", "Who wrote this book? <image> Answer briefly."), ("gpt", "Nobody."))},
    {"id": 7, "image": "vg/VG_100K_2/palette.png",
     "conversations": _turns(("gpt", "A stray answer first."), ("human", "<image>\nDescribe it."), ("gpt", "Stripes."))},
    {"id": "rot-1", "image": ROTATED,
     "conversations": _turns(("human", "<image>\nIs the photo upright?"), ("gpt", "No."))},
    {"id": "i6IyJda_0", "model": "", "conversations": _turns(("human", "Write a haiku."), ("gpt", "Shapes sit still."),
                                                            ("human", "Another."), ("gpt", "Red, blue, green."))},
    {"id": "sharegpt-2", "conversations": _turns(("human", "Hello?"), ("gpt", "Hello."), ("human", "Bye?"))},
    {"id": "bad-list", "image": ["a.jpg", "b.jpg"], "conversations": _turns(("human", "<image>\nx"), ("gpt", "y"))},
    {"id": "bad-number", "image": 12, "conversations": _turns(("human", "<image>\nx"), ("gpt", "y"))},
]
PRETRAIN = [
    {"id": "004539375", "image": "00453/004539375.png",
     "conversations": _turns(("human", "Give a brief description of the image.\n<image>"), ("gpt", "shapes on grey"))},
    {"id": 33471, "image": "coco/train2017/000000033471.jpg",
     "conversations": _turns(("human", "<image>\nRender a clear and concise summary of the photo."),
                             ("gpt", "a red square"))},
    {"id": "gqa", "image": "gqa/images/2354786.jpg",
     "conversations": _turns(("human", "Share a concise interpretation of the image provided.\n<image>"),
                             ("gpt", "a grey circle"))},
    {"id": "rot", "image": ROTATED, "conversations": _turns(("human", "<image>"), ("gpt", "a sideways photo"))},
]


def _write_image(path, mode: str, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", SIZE, (200, 40, 40))
    image.paste((30, 30, 220), (0, 0, 16, 32))  # a blue band on the left: where it ends up shows the frame
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    elif mode != "RGB":
        image = image.convert(mode)
    exif = Image.Exif()
    if path.name == "rotated.jpg":
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(path, fmt, **({"exif": exif} if fmt == "JPEG" else {}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for key, (mode, fmt) in IMAGES.items():
        _write_image(root / "images" / key, mode, fmt)
    (root / "finetune.json").write_text(json.dumps(FINETUNE))
    (root / "pretrain.json").write_text(json.dumps(PRETRAIN))
    return root


def test_records_as_they_come_are_kept_and_bad_images_counted_by_name(corpus, caplog, fault_ledger):
    with caplog.at_level(logging.WARNING):
        kept, report = load_conversations(corpus / "finetune.json")
    assert [r["id"] for r in kept] == [33471, "2354786", "0060931698", 7, "rot-1", "i6IyJda_0", "sharegpt-2"]
    assert report.rejected == {"malformed_image_field": 2}
    assert report.kept + sum(report.rejected.values()) == report.records == len(FINETUNE)
    assert "record bad-list rejected: 'image' must be a non-empty path string, got list" in caplog.text
    assert "record bad-number rejected: 'image' must be a non-empty path string, got int" in caplog.text
    fault_ledger.record("corpus record with a list or number as image", survived=True, rows_lost=0)


def test_every_image_mode_and_text_only_record_becomes_a_sample(corpus, tiny_config):
    from mgllava.model import IMAGE_TOKEN_INDEX, MGLLaVAProcessor

    kept, _ = load_conversations(corpus / "finetune.json")
    processor = MGLLaVAProcessor.from_config(tiny_config.model)
    dataset = ConversationDataset(kept, corpus / "images", {}, processor)
    samples = [dataset[i] for i in range(len(dataset))]
    assert not [s for s in samples if isinstance(s, Skipped)]
    n_image_tokens = processor.image_seq_length  # each <image>: N image placeholders
    assert [int((s["input_ids"] == IMAGE_TOKEN_INDEX).sum()) // n_image_tokens for s in samples] == [1, 1, 1, 1, 1, 0, 0]
    for sample in samples:
        assert sample["input_ids"][0] == processor.tokenizer.bos_token_id  # the image token moved to the front...
        assert sample["pixel_values"].isfinite().all()
    for sample in samples[:5]:
        ids = sample["input_ids"].tolist()
        before = processor.tokenizer.decode(ids[1 : ids.index(IMAGE_TOKEN_INDEX)])
        assert before.endswith("USER: ") and before.count("USER:") == 1  # ...of the first turn
    # the reference does not apply EXIF rotation: the image is used in its stored frame, as detection sees it
    rotated = dataset.load_image(ROTATED)
    assert rotated.size == SIZE and rotated.getpixel((2, 16))[2] > 150  # the blue band still on the left


@pytest.mark.slow
def test_each_stage_trains_one_step_on_the_corpus(corpus, tiny_config):
    from mgllava.train.job import train

    config = tiny_config
    config.data.image_root = str(corpus / "images")
    config.data.pretrain_json, config.data.finetune_json = str(corpus / "pretrain.json"), str(corpus / "finetune.json")
    for name, n_samples in (("pretrain", len(PRETRAIN)), ("finetune", 7)):
        stage = getattr(config.train, name)
        stage.micro_batch = 1  # each assignment is validated: global_batch must stay divisible
        stage.global_batch, stage.micro_batch = n_samples, n_samples  # one step sees every usable record
        stage.max_steps = 1
    config.data.cache_image_features = False
    pretrain = train(config, "pretrain", run_id="corpus", progress=False)
    config.data.cache_image_features = True  # both ways of feeding images
    finetune = train(config, "finetune", run_id="corpus", progress=False)
    for summary in (pretrain, finetune):
        assert summary["steps"] == 1 and summary["skipped_samples"] == {}
        assert summary["final_loss"] == summary["final_loss"]  # not NaN
    assert finetune["records"] == len(FINETUNE) and finetune["rejected_records"] == {"malformed_image_field": 2}
