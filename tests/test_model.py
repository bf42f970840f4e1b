"""The assembled MG-LLaVA on the tiny zoo: shapes, batching, generation, stages, checkpoints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import TINY_TOWER_SCENES
from PIL import Image

from mgllava.config import ZooConfig, load_config
from mgllava.model import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    OBJECT_TOKEN_INDEX,
    Boxes,
    FrozenImageFeatures,
    MGLLaVAForConditionalGeneration,
    MGLLaVAProcessor,
    answer_questions,
    pool_object_features,
)
from mgllava.shapes.world import generate_world
from mgllava.shapes.zoo import build_zoo

HIGH_RES, LOW_RES, MAX_LENGTH = 256, 112, 512


@pytest.fixture(scope="session")
def world_and_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    generate_world(root / "world", n_images=24, seed=0, progress=False)
    build_zoo(root / "zoo", root / "world", HIGH_RES, LOW_RES, MAX_LENGTH,
              ZooConfig(tower_scenes=TINY_TOWER_SCENES, tower_epochs=1))
    return root


@pytest.fixture(scope="session")
def model_config(world_and_zoo):
    return load_config("tiny", overrides=[f"work_dir={world_and_zoo}"]).model


@pytest.fixture
def model(model_config):
    torch.manual_seed(0)
    return MGLLaVAForConditionalGeneration.from_config(model_config).eval()


@pytest.fixture(scope="session")
def processor(model_config):
    return MGLLaVAProcessor.from_config(model_config)


@pytest.fixture(scope="session")
def world_samples(world_and_zoo):
    """(image, Boxes) of the first 4 world images (non-square, 1+ objects each)."""
    records = [
        json.loads(line) for line in (world_and_zoo / "world" / "annotations.jsonl").read_text().splitlines()
    ]
    samples = []
    for record in records[:4]:
        image = Image.open(world_and_zoo / "world" / "images" / record["image"]).convert("RGB")
        objects = record["objects"]
        boxes = Boxes(
            torch.tensor([o["box"] for o in objects], dtype=torch.float32),
            [o["shape"] for o in objects],
            torch.linspace(0.9, 0.5, len(objects)),
        )
        samples.append((image, boxes))
    return samples


def _randomise_trainable(model: MGLLaVAForConditionalGeneration, seed: int = 1) -> None:
    """Move the trainable weights away from their initialisation (zero projections included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _records(processor: MGLLaVAProcessor, world_samples):
    """Training records covering: one image with boxes, zero boxes, two images, text only."""
    (image_a, boxes_a), (image_b, boxes_b), (image_c, _), _ = world_samples
    return [
        processor([("human", "<image>\nWhat shapes?"), ("gpt", "A square.")], [image_a], [boxes_a]),
        processor([("human", "<image>\nDescribe."), ("gpt", "Nothing.")], [image_c], [None]),
        processor(
            [("human", "<image>\nand <image>\nCompare."), ("gpt", "Both have shapes.")],
            [image_b, image_a],
            [boxes_b, Boxes.empty()],
        ),
        processor([("human", "Hello there"), ("gpt", "Hi.")]),
    ]


def _small_batch(processor: MGLLaVAProcessor, world_samples) -> dict:
    """A right-padded batch of one image with boxes and one text-only record."""
    image, boxes = world_samples[0]
    records = [
        processor([("human", "<image>\nWhat shapes?"), ("gpt", "A square.")], [image], [boxes]),
        processor([("human", "Hello there"), ("gpt", "Hi.")]),
    ]
    return processor.collate(records)


# --------------------------------------------------------------------------- shapes


def test_tiny_shapes(model, processor, world_samples):
    image, boxes = world_samples[0]
    pixel_values, mapped = processor.process_image(image, boxes)
    assert pixel_values.shape == (3, HIGH_RES, HIGH_RES)
    assert mapped.shape == (len(boxes), 4)
    with torch.no_grad():
        stage_maps = model.high_res_encoder(pixel_values[None])
        low = model.low_res_encoder(torch.nn.functional.interpolate(pixel_values[None], size=LOW_RES))
        image_tokens, object_tokens = model.encode_images(pixel_values[None], [mapped])
    assert [tuple(m.shape) for m in stage_maps] == [
        (1, 40, 64, 64),
        (1, 80, 32, 32),
        (1, 160, 16, 16),
        (1, 320, 8, 8),
    ]
    assert low.shape == (1, 64, 64)  # 8 x 8 CLIP tokens, width 64, CLS dropped
    width = model.llm.config.hidden_size
    assert image_tokens.shape == (1, 64, width)
    assert [t.shape for t in object_tokens] == [(len(boxes), width)]
    assert model.box_projector[0].in_features == 40 + 80 + 160 + 320


def test_processor_tokenises_and_masks(processor, world_samples):
    tokenizer = processor.tokenizer
    record = processor([("human", "<image>\nWhat shapes?"), ("gpt", "A square.")], [world_samples[0][0]])
    ids, labels = record["input_ids"], record["labels"]
    assert ids[0] == tokenizer.bos_token_id
    # <image> -> its 64 image placeholders, then one object placeholder (no detections: one zero box)
    first = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0])
    assert ids[first:first + 65].tolist() == [IMAGE_TOKEN_INDEX] * 64 + [OBJECT_TOKEN_INDEX]
    assert (ids < 0).sum() == 65 and (labels[ids < 0] == IGNORE_INDEX).all()
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])
    assert tokenizer.decode(ids[trained]) == "A square.</s>"
    assert record["boxes"][0].tolist() == [[0, 0, 0, 0]]  # no detections given: one all-zero box
    long_turns = [("human", "word " * 2000), ("gpt", "ok")]
    assert len(processor(long_turns)["input_ids"]) == processor.max_text_length == MAX_LENGTH - 64
    with pytest.raises(ValueError, match="placeholders"):
        processor([("human", "no placeholder"), ("gpt", "x")], [world_samples[0][0]])
    clone = pickle.loads(pickle.dumps(processor))  # DataLoader workers receive a pickled copy
    assert torch.equal(clone(long_turns)["input_ids"], processor(long_turns)["input_ids"])


def test_generation_prompt_carries_the_chat_history(processor):
    tokenizer = processor.tokenizer
    first = processor.generation_prompt("Is there a star?", with_image=True)
    second = processor.generation_prompt("What color is it?", with_image=True, history=[("Is there a star?", "yes")])
    assert (first == IMAGE_TOKEN_INDEX).sum() == 1 and (second == IMAGE_TOKEN_INDEX).sum() == 1
    text = tokenizer.decode(second[second != IMAGE_TOKEN_INDEX])
    assert text.index("Is there a star?") < text.index("yes") < text.index("What color is it?")
    assert text.rstrip().endswith(processor.template.instruction.format(input="What color is it?").strip())


def test_vision_tower_loads_from_a_full_clip_checkpoint(model_config, tmp_path):
    """The public CLIP directories hold a whole CLIPModel (text + vision): the vision part is used."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from mgllava.model import MGLLaVAProcessor, load_low_res_encoder

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip = CLIPModel(
        CLIPConfig(vision_config={**vision, "image_size": 112, "patch_size": 14}, text_config=text)
    )
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor.from_pretrained(model_config.vision.clip_path).save_pretrained(tmp_path / "clip")
    encoder = load_low_res_encoder(tmp_path / "clip", select_layer=-2)
    assert (encoder.hidden_size, encoder.grid) == (32, 8)
    assert torch.equal(
        encoder.clip.embeddings.patch_embedding.weight,
        clip.vision_model.embeddings.patch_embedding.weight,
    )
    config = model_config.model_copy(deep=True)
    config.vision.clip_path = str(tmp_path / "clip")
    assert MGLLaVAProcessor.from_config(config).max_text_length == MAX_LENGTH - 64


def test_collate_pads_right(processor, world_samples):
    records = _records(processor, world_samples)
    batch = processor.collate(records)
    lengths = [len(r["input_ids"]) for r in records]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    pad = processor.pad_token_id
    for row, n in enumerate(lengths):
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (4, 3, HIGH_RES, HIGH_RES)  # 1 + 1 + 2 + 0 images
    assert [len(b) for b in batch["boxes"]][1:] == [1, len(world_samples[1][1]), 1]  # no boxes: one zero box


# --------------------------------------------------------------------------- batching


def test_batched_logits_equal_per_sample(model, processor, world_samples):
    _randomise_trainable(model)
    records = _records(processor, world_samples)
    with torch.no_grad():
        singles = [model(**processor.collate([record])).logits[0] for record in records]  # (T_i, vocab)
        for padding_side in ("right", "left"):
            batch = processor.collate(records, padding_side=padding_side)
            batched = model(**batch).logits  # (4, T, vocab)
            for row, single in enumerate(singles):
                n = len(single)
                rows = batched[row, -n:] if padding_side == "left" else batched[row, :n]
                torch.testing.assert_close(rows, single, atol=1e-5, rtol=1e-4)


def test_batched_loss_masks_visual_positions(model, processor, world_samples):
    batch = processor.collate(_records(processor, world_samples))
    n_visual = 64 * 4 + sum(len(b) for b in batch["boxes"])
    assert int((batch["input_ids"] < 0).sum()) == n_visual  # each image -> its image and object placeholders
    assert (batch["labels"][batch["input_ids"] < 0] == IGNORE_INDEX).all()
    assert torch.isfinite(model(**batch).loss)


def test_precomputed_frozen_features_give_the_same_loss_and_gradients(model, processor, world_samples):
    """Training's feature cache: each image encoded alone, then batched, must equal encoding the batch."""
    _randomise_trainable(model)
    model.set_stage("finetune")
    batch = processor.collate(_records(processor, world_samples))
    per_image = [
        model.encode_frozen(pixels[None], [boxes]) for pixels, boxes in zip(batch["pixel_values"], batch["boxes"])
    ]
    cached = {**batch, "pixel_values": None, "boxes": [], "image_features": FrozenImageFeatures.cat(per_image)}
    losses, grads = [], []
    for inputs in (batch, cached):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.box_projector[0].weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0  # the object tokens did reach the loss
    model.zero_grad()
    model.set_stage("pretrain")


def test_the_llm_attention_setting_picks_the_kernel_and_keeps_loss_and_gradients(model_config, processor,
                                                                                 world_samples):
    """``model.llm.attention``: eager and SDPA are two kernels of one function, on a training batch
    (right-padded, no mask, as :class:`~mgllava.train.data.Collate` builds it)."""
    batch = processor.collate(_records(processor, world_samples), padding_side="right")
    del batch["attention_mask"]
    losses, grads = {}, {}
    for attention in ("sdpa", "eager"):
        config = model_config.model_copy(deep=True)
        config.llm.attention = attention
        torch.manual_seed(0)
        model = MGLLaVAForConditionalGeneration.from_config(config)
        assert model.llm.config._attn_implementation == attention
        _randomise_trainable(model)
        model.set_stage("finetune")
        loss = model(**batch).loss
        loss.backward()
        losses[attention] = loss.detach()
        grads[attention] = model.llm.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(losses["eager"], losses["sdpa"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["eager"], grads["sdpa"], atol=1e-5, rtol=1e-4)
    assert grads["sdpa"].abs().sum() > 0


def test_generation_batched_equals_one_by_one(model, processor, world_samples):
    _randomise_trainable(model)
    (image_a, boxes_a), (image_b, _), _, (image_d, boxes_d) = world_samples
    images = [image_a, image_b, None, image_d]
    boxes = [boxes_a, None, None, Boxes(boxes_d.xyxy[:1], boxes_d.labels[:1], boxes_d.scores[:1])]
    questions = ["What shapes are there?", "Color?", "Say something long and friendly please.", "Where?"]
    batched = answer_questions(model, processor, images, boxes, questions, max_new_tokens=6)
    single = [answer_questions(model, processor, [i], [b], [q], max_new_tokens=6)[0]
              for i, b, q in zip(images, boxes, questions)]
    print("generations:", batched)
    assert batched == single
    assert all(isinstance(text, str) for text in batched)


# --------------------------------------------------------------------------- stages


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_frozen_parameters_get_no_gradient(model, processor, world_samples, stage):
    model.set_stage(stage)
    model.train()
    assert not model.high_res_encoder.training and not model.low_res_encoder.training
    model(**_small_batch(processor, world_samples)).loss.backward()
    trainable_modules = {"fusion", "projector", "box_projector"} | ({"llm"} if stage == "finetune" else set())
    for name, parameter in model.named_parameters():
        module = name.split(".", 1)[0]
        if module in trainable_modules:
            assert parameter.requires_grad and parameter.grad is not None, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    assert model.projector[0].weight.grad.abs().sum() > 0
    assert model.box_projector[0].weight.grad.abs().sum() > 0
    summary = model.trainable_summary()
    print(summary)
    llm_row = next(line for line in summary.splitlines() if line.startswith("llm"))
    assert (llm_row.split()[1] == "0") == (stage == "pretrain")
    with pytest.raises(ValueError):
        model.set_stage("everything")


# --------------------------------------------------------------------------- checkpoints


def _logits(model: MGLLaVAForConditionalGeneration, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_save_then_load_trainable_reproduces_logits(model, processor, model_config, world_samples, tmp_path, stage):
    model.set_stage(stage)
    _randomise_trainable(model)
    batch = _small_batch(processor, world_samples)
    path = model.save_trainable(tmp_path / "trainable.safetensors")
    torch.manual_seed(123)
    fresh = MGLLaVAForConditionalGeneration.from_config(model_config).eval()
    fresh.set_stage(stage)
    expected = _logits(model, batch)
    assert not torch.equal(_logits(fresh, batch), expected)
    fresh.load_trainable(path)
    assert torch.equal(_logits(fresh, batch), expected)


def test_export_then_from_pretrained_reproduces_logits(model, processor, world_samples, tmp_path):
    model.set_stage("finetune")
    _randomise_trainable(model)
    batch = _small_batch(processor, world_samples)
    export_dir = model.export(tmp_path / "export", processor)
    config = json.loads((export_dir / "config.json").read_text())
    assert (config["text_config"]["model_type"], config["vision_config"]["model_type"]) == ("llama", "clip_vision_model")
    loaded = MGLLaVAForConditionalGeneration.from_pretrained(export_dir).eval()
    loaded.llm.set_attn_implementation(model.llm.config._attn_implementation)  # a load-time choice, not exported
    assert loaded.config.convnext_config == model.config.convnext_config
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


# --------------------------------------------------------------------------- direct vs lean


def test_direct_and_lean_object_features_nearly_agree(model, processor, world_samples):
    """Report how far the memory-lean pooling is from the paper's direct one on real (random) ConvNeXt maps.

    The lean method samples each stage map bilinearly where the direct one samples a bilinear
    upsampling of it: both are smooth interpolations of the same grid values, averaged over
    R x R cells, so they differ only by second-order interpolation terms and at the map border
    (clamping). Measured (tiny, 14 boxes of the shapes world): relative L2 per box mean 1.2%,
    max 1.8%; at full size (tests/test_model_full_size.py) 0.2%. The 10% tolerance leaves room
    for other images and weights while still catching a mapping error: the same boxes shifted
    by 24 px differ by about 65%.
    """
    processed = [processor.process_image(image, boxes) for image, boxes in world_samples]
    pixel_values = torch.stack([p for p, _ in processed])
    boxes = [b for _, b in processed]
    with torch.no_grad():
        stage_maps = model.high_res_encoder(pixel_values)
        direct = torch.cat(pool_object_features(stage_maps, boxes, HIGH_RES, 14, "direct"))
        lean = torch.cat(pool_object_features(stage_maps, boxes, HIGH_RES, 14, "lean"))
        shifted = [b + torch.tensor([24.0, 24.0, 24.0, 24.0]) for b in boxes]
        misplaced = torch.cat(pool_object_features(stage_maps, shifted, HIGH_RES, 14, "lean"))
    relative = (direct - lean).norm(dim=1) / direct.norm(dim=1)  # (sum K,)
    relative_misplaced = (direct - misplaced).norm(dim=1) / direct.norm(dim=1)
    print(
        f"\ndirect vs lean over {len(relative)} boxes: relative L2 mean {relative.mean():.4f} "
        f"max {relative.max():.4f}; max abs {(direct - lean).abs().max():.4g}; "
        f"a box shifted by 24 px: mean {relative_misplaced.mean():.4f}"
    )
    assert relative.max() < 0.10
    assert relative_misplaced.mean() > 3 * relative.mean()
