"""MG-LLaVA in Hugging Face's conventions, on the tiny zoo: the vectorised splice against the former
row-by-row one, ``generate`` against a reference greedy loop, batched against one-by-one decoding,
``save_pretrained`` exports through the Auto classes, legacy exports, streaming, and a light ``import``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_overrides
from PIL import Image
from safetensors.torch import save_file

from mgllava.config import load_config
from mgllava.model import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    OBJECT_TOKEN_INDEX,
    Boxes,
    MGLLaVAConfig,
    MGLLaVAForConditionalGeneration,
    MGLLaVAProcessor,
    answer_questions,
    upgrade_export,
)
from mgllava.model.modeling_mgllava import LABELLED_ROWS_MULTIPLE, next_token_loss

IMAGES = [Image.new("RGB", (300, 200), (200, 40, 40)), Image.new("RGB", (160, 240), (30, 160, 60))]
BOXES = [Boxes([[20, 30, 120, 150], [150, 20, 280, 180]], ["square", "circle"], [0.9, 0.6]), None]


@pytest.fixture(scope="module")
def tiny(tiny_world, tiny_zoo, tmp_path_factory):
    """(ModelConfig, model with its trainable weights moved off their initialisation, processor)."""
    config = load_config(overrides=tiny_overrides(tiny_world, tiny_zoo, tmp_path_factory.mktemp("hf"))).model
    torch.manual_seed(0)
    model = MGLLaVAForConditionalGeneration.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return config, model, MGLLaVAProcessor.from_config(config)


def _records(processor: MGLLaVAProcessor) -> list[dict]:
    """One image with two boxes, one image without boxes (one zero box), two images, text only."""
    return [
        processor([("human", "<image>\nWhat shapes?"), ("gpt", "A red square.")], [IMAGES[0]], [BOXES[0]]),
        processor([("human", "<image>\nDescribe."), ("gpt", "Nothing.")], [IMAGES[1]], [None]),
        processor([("human", "<image>\nand <image>\nCompare."), ("gpt", "Both.")], IMAGES, BOXES),
        processor([("human", "Hello there"), ("gpt", "Hi.")]),
    ]


def _logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------- the splice


def _reference_splice(input_ids, attention_mask, labels, embed_tokens, image_tokens, object_tokens):
    """The former row-by-row splice (right padding): each ``IMAGE_TOKEN_INDEX`` of the unexpanded text
    replaced by its image's N image tokens and K object tokens, labels -100 there."""
    text_embeds = embed_tokens(input_ids.clamp(min=0))
    visual_tokens = iter(torch.cat([i, o]) for i, o in zip(image_tokens, object_tokens))
    rows = []
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        ids, embeds, row_labels = input_ids[row][real], text_embeds[row][real], labels[row][real]
        embed_pieces, label_pieces, start = [], [], 0
        for position in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
            visual = next(visual_tokens)
            embed_pieces += [embeds[start:position], visual]
            label_pieces += [row_labels[start:position], ids.new_full((len(visual),), IGNORE_INDEX)]
            start = position + 1
        rows.append((torch.cat(embed_pieces + [embeds[start:]]), torch.cat(label_pieces + [row_labels[start:]])))
    length = max(len(e) for e, _ in rows)
    inputs_embeds = text_embeds.new_zeros(len(rows), length, text_embeds.shape[-1])
    new_mask = attention_mask.new_zeros(len(rows), length)
    new_labels = input_ids.new_full((len(rows), length), IGNORE_INDEX)
    for row, (embeds, row_labels) in enumerate(rows):
        inputs_embeds[row, : len(embeds)], new_mask[row, : len(embeds)], new_labels[row, : len(embeds)] = (
            embeds, 1, row_labels
        )
    return inputs_embeds, new_mask, new_labels


def _collapse(ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expanded record back to one ``IMAGE_TOKEN_INDEX`` per image (the text before the expansion)."""
    keep = ids != OBJECT_TOKEN_INDEX
    keep[1:] &= ~((ids[1:] == IMAGE_TOKEN_INDEX) & (ids[:-1] == IMAGE_TOKEN_INDEX))
    return ids[keep], labels[keep]


def test_scatter_splice_equals_the_row_by_row_splice(tiny):
    """Same embeddings, labels and loss as the former splice on a batch with 0, 1 and 2 images a row."""
    _, model, processor = tiny
    records = _records(processor)
    batch = processor.collate(records)
    n_images = 64 * 4  # N = 64 image tokens for each of the 4 images
    assert int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == n_images
    assert int((batch["input_ids"] == OBJECT_TOKEN_INDEX).sum()) == sum(len(b) for b in batch["boxes"])
    placeholders = batch["input_ids"] < 0
    assert (batch["labels"][placeholders] == IGNORE_INDEX).all()

    collapsed = [dict(zip(("input_ids", "labels"), _collapse(r["input_ids"], r["labels"]))) for r in records]
    old = processor.collate(collapsed)
    assert int((old["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 4
    with torch.no_grad():
        image_tokens, object_tokens = model.encode_images(batch["pixel_values"], batch["boxes"])
        expected_embeds, expected_mask, expected_labels = _reference_splice(
            old["input_ids"], old["attention_mask"], old["labels"], model.get_input_embeddings(),
            list(image_tokens), object_tokens,
        )
        embeds = model.embed_multimodal(batch["input_ids"], batch["pixel_values"], batch["boxes"])
        expected_loss = model.llm(inputs_embeds=expected_embeds, attention_mask=expected_mask,
                                  labels=expected_labels).loss
        loss = model(**batch).loss
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["attention_mask"], expected_mask) and torch.equal(batch["labels"], expected_labels)
    assert torch.equal(embeds[real], expected_embeds[real])
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)


def test_the_training_loss_from_labelled_positions_equals_the_loss_from_full_logits(tiny):
    """``loss_only`` (what training runs) projects only the labelled positions to the vocabulary; its loss
    and gradients are those of transformers' loss over the (B, T, vocab) logits, on a batch with images,
    objects, padding and a text-only row."""
    _, model, processor = tiny
    batch = processor.collate(_records(processor))
    assert (batch["labels"] == IGNORE_INDEX).float().mean() > 0.5  # most positions predict nothing

    def loss_and_grads(**options):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, **options).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    projected: list[int] = []  # rows the output projection sees
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda _, args, out: projected.append(args[0].shape[:-1].numel()))
    model.train()
    model.set_stage("finetune")  # the LLM's weights, its output projection's included, get gradients
    try:
        full_loss, full_grads = loss_and_grads()
        loss, grads = loss_and_grads(loss_only=True)
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
        model.set_stage("pretrain")
        model.eval()
    n_labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert projected[0] == batch["labels"].numel()  # transformers: every position
    assert n_labelled <= projected[1] < n_labelled + LABELLED_ROWS_MULTIPLE  # rounded up: few distinct shapes
    assert projected[1] % LABELLED_ROWS_MULTIPLE == 0
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=1e-6)
    assert grads.keys() == full_grads.keys() and "llm.lm_head.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model(**batch, loss_only=True).logits is None
    with pytest.raises(ValueError, match="labels"):
        model(**{key: value for key, value in batch.items() if key != "labels"}, loss_only=True)


def test_an_llm_whose_logits_are_more_than_its_output_projection_gets_its_own_loss():
    """Gemma-2 soft-caps its logits after the output projection: the loss from labelled positions alone
    would skip that, so ``next_token_loss`` returns the LLM's own loss for it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    llm = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         final_logit_softcapping=0.5, tie_word_embeddings=False))
    with torch.no_grad():
        llm.lm_head.weight.mul_(100)  # logits of a few units, where the cap at 0.5 bends them
    input_ids = torch.randint(0, 64, (2, 12))
    labels = torch.where(torch.arange(12) < 6, IGNORE_INDEX, input_ids)
    own = llm(input_ids=input_ids, labels=labels).loss
    torch.testing.assert_close(next_token_loss(llm, labels, input_ids=input_ids), own, rtol=0, atol=1e-6)
    hidden = llm.get_decoder()(input_ids=input_ids).last_hidden_state
    uncapped = torch.nn.functional.cross_entropy(llm.lm_head(hidden[:, 5:-1]).flatten(0, 1), labels[:, 6:].flatten())
    assert abs(float(uncapped) - float(own)) > 0.1  # the soft-cap matters at these sizes


def test_placeholder_count_mismatch_is_an_error(tiny):
    _, model, processor = tiny
    batch = processor.collate(_records(processor)[:1])
    with pytest.raises(ValueError, match="2 object placeholders"):  # the record's two boxes, one given
        model.embed_multimodal(batch["input_ids"], batch["pixel_values"], [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match="no images"):
        model.embed_multimodal(batch["input_ids"])


def test_left_and_right_padding_give_each_row_its_own_logits(tiny):
    _, model, processor = tiny
    records = _records(processor)
    singles = [_logits(model, processor.collate([r]))[0] for r in records]
    for side in ("right", "left"):
        batched = _logits(model, processor.collate(records, padding_side=side))
        for row, single in enumerate(singles):
            n = len(single)
            torch.testing.assert_close(batched[row, -n:] if side == "left" else batched[row, :n], single,
                                       atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- generation


def test_generate_equals_a_reference_greedy_loop(tiny):
    """``generate`` (KV cache) picks the tokens a cache-free argmax loop over the whole sequence picks."""
    _, model, processor = tiny
    inputs = processor.chat_inputs([IMAGES[0]], [BOXES[0]], ["What shapes are there?"])
    steps = 6
    generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None)
    prompt = inputs["input_ids"].shape[1]
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(steps):
            embeds = model.embed_multimodal(ids, inputs["pixel_values"], inputs["boxes"])
            next_token = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, next_token[:, None]], dim=1)
    assert generated.shape[1] == prompt + steps
    assert generated[0, prompt:].tolist() == ids[0, prompt:].tolist()


def test_logits_processors_that_index_by_the_sequence_s_ids_work(tiny):
    """``repetition_penalty`` and ``no_repeat_ngram_size`` read the vocabulary at the sequence's ids: the
    prompt's placeholders (negative ids) must not reach them (they raised, or banned the wrong token)."""
    _, model, processor = tiny
    inputs = processor.chat_inputs([IMAGES[0]], [BOXES[0]], ["What shapes are there?"])
    prompt, ids = inputs["input_ids"].shape[1], inputs["input_ids"][0]
    model.generate(**inputs, max_new_tokens=4, do_sample=False, repetition_penalty=1.5)
    new = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None,
                         no_repeat_ngram_size=1)[0, prompt:].tolist()
    assert len(set(new)) == len(new) and not set(new) & set(ids[ids >= 0].tolist())


QUESTIONS = ["What shapes are there?", "Say something long and friendly please.", "Where is it?"]


@pytest.mark.parametrize("decoding", [{}, {"num_beams": 2}])
def test_batched_generation_equals_one_by_one(tiny, decoding):
    """Left-padded rows with and without an image (greedy, and beam search: each row's image is repeated
    with its beams) decode as they do alone."""
    _, model, processor = tiny
    images, boxes = [IMAGES[0], None, IMAGES[1]], [BOXES[0], None, None]
    batched = answer_questions(model, processor, images, boxes, QUESTIONS, max_new_tokens=6, **decoding)
    single = [answer_questions(model, processor, [i], [b], [q], max_new_tokens=6, **decoding)[0]
              for i, b, q in zip(images, boxes, QUESTIONS)]
    print("answers:", batched)
    assert batched == single and all(isinstance(text, str) for text in batched)


def test_precomputed_image_features_answer_as_the_images(tiny):
    """An image may come as its frozen features (encoded from the processor's pixel values and boxes):
    the same answers; a batch mixing images and features is refused."""
    _, model, processor = tiny
    processed = [processor.process_image(image, b) for image, b in zip(IMAGES, BOXES)]
    features = model.encode_frozen(torch.stack([p for p, _ in processed]), [b for _, b in processed]).unbind()
    expected = answer_questions(model, processor, [IMAGES[0], None, IMAGES[1]], [BOXES[0], None, BOXES[1]],
                                QUESTIONS, max_new_tokens=6)
    assert answer_questions(model, processor, [features[0], None, features[1]], [None] * 3, QUESTIONS,
                            max_new_tokens=6) == expected
    with pytest.raises(ValueError, match="mixes images and precomputed image features"):
        processor.chat_inputs([IMAGES[0], features[1]], [BOXES[0], None], QUESTIONS[:2])


def test_sampling_is_seeded_and_streaming_prints_the_answer(tiny, capsys):
    from transformers import TextStreamer

    _, model, processor = tiny
    sampled = []
    for _ in range(2):
        torch.manual_seed(7)
        sampled.append(answer_questions(model, processor, [IMAGES[0]], [BOXES[0]], ["Hi?"], max_new_tokens=5,
                                        do_sample=True, temperature=1.5, top_k=50))
    assert sampled[0] == sampled[1]
    capsys.readouterr()
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    answer = answer_questions(model, processor, [IMAGES[0]], [BOXES[0]], ["Hi?"], max_new_tokens=5,
                              streamer=streamer)[0]
    assert capsys.readouterr().out.strip() == answer


def test_generation_stops_at_the_end_of_the_answer(tiny):
    """An LLM that always predicts EOS gives empty answers, with and without an image."""
    _, model, processor = tiny
    eos = torch.tensor([processor.tokenizer.eos_token_id])
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda _, __, out: out.index_fill(-1, eos, 1e4))
    try:
        assert answer_questions(model, processor, [IMAGES[0], None], [BOXES[0], None], ["Hi?", "Hello?"],
                                max_new_tokens=5) == ["", ""]
    finally:
        hook.remove()


# --------------------------------------------------------------------------- exports


def test_export_loads_with_the_auto_classes_and_generates(tiny, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from mgllava.model import modeling_mgllava

    _, model, processor = tiny
    monkeypatch.setattr(modeling_mgllava, "EXPORT_SHARD_SIZE", "2MB")  # shards, as a full-size export has
    export = model.export(tmp_path / "export", processor)
    files = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "processor_config.json", "tokenizer.json"} <= files
    assert len([name for name in files if name.endswith(".safetensors")]) > 1
    assert json.loads((export / "config.json").read_text())["model_type"] == "mgllava"
    assert AutoConfig.from_pretrained(export).image_seq_length == 64
    loaded = AutoModelForImageTextToText.from_pretrained(export).eval()
    loaded.llm.set_attn_implementation(model.llm.config._attn_implementation)  # a load-time choice, not exported
    loaded_processor = AutoProcessor.from_pretrained(export)
    assert isinstance(loaded, MGLLaVAForConditionalGeneration) and isinstance(loaded_processor, MGLLaVAProcessor)
    assert loaded_processor.to_dict() == processor.to_dict()
    batch = processor.collate(_records(processor))
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    answers = answer_questions(loaded, loaded_processor, [IMAGES[0]], [BOXES[0]], ["What?"], max_new_tokens=4)
    assert answers == answer_questions(model, processor, [IMAGES[0]], [BOXES[0]], ["What?"], max_new_tokens=4)


def _write_legacy_export(config, model, directory) -> None:
    """The former export layout: llm/, clip/, convnext/ copied, the projectors, mgllava_config.json."""
    for name, source in (("llm", config.llm.path), ("clip", config.vision.clip_path),
                         ("convnext", config.vision.convnext_path)):
        shutil.copytree(source, directory / name)
    save_file(model.projector_state_dict(), directory / "mgllava_projectors.safetensors")
    legacy = config.model_copy(deep=True)
    legacy.llm.path, legacy.vision.clip_path, legacy.vision.convnext_path = "llm", "clip", "convnext"
    (directory / "mgllava_config.json").write_text(legacy.model_dump_json())
    (directory / "detector").mkdir()
    (directory / "detector" / "detector.json").write_text("{}")


def test_a_legacy_export_loads_and_upgrades(tiny, tmp_path):
    from transformers import AutoModelForImageTextToText

    config, model, processor = tiny
    legacy = tmp_path / "legacy"
    _write_legacy_export(config, model, legacy)
    batch = processor.collate(_records(processor))
    expected = _logits(model, batch)
    assert torch.equal(_logits(MGLLaVAForConditionalGeneration.from_pretrained(legacy).eval(), batch), expected)
    assert MGLLaVAProcessor.from_pretrained(legacy).to_dict() == processor.to_dict()

    upgrade_export(legacy)
    assert (legacy / "config.json").is_file() and not (legacy / "mgllava_config.json").exists()
    assert not (legacy / "llm").exists() and (legacy / "detector" / "detector.json").read_text() == "{}"
    upgraded = AutoModelForImageTextToText.from_pretrained(legacy).eval()
    upgraded.llm.set_attn_implementation(model.llm.config._attn_implementation)  # a load-time choice, not exported
    assert torch.equal(_logits(upgraded, batch), expected)
    with pytest.raises(ValueError, match="not a legacy"):
        upgrade_export(legacy)


def test_import_is_light_and_registers_when_transformers_comes():
    """``import mgllava`` loads neither torch nor transformers; importing transformers afterwards makes
    the Auto classes know ``mgllava``."""
    code = (
        "import sys, mgllava\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('mgllava')).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "MGLLaVAConfig"


def test_a_config_built_around_loaded_towers_leaves_their_attention_kernels_alone():
    """transformers sets a composite config's attention kernel on its sub-configs too: built around a
    tower's own config object, it would reset that tower to None, which runs eager attention."""
    from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig

    llm = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        attn_implementation="sdpa")
    clip = AutoModel.from_config(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=28, patch_size=14), attn_implementation="sdpa")
    config = MGLLaVAConfig(text_config=llm.config, vision_config=clip.config)
    assert llm.config._attn_implementation == clip.config._attn_implementation == "sdpa"
    assert config.text_config.hidden_size == 32 and config.vision_config.image_size == 28
