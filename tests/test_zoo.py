"""The tiny zoo: saved in the public layouts, reloaded by the full-size loading code, identically."""

from __future__ import annotations

import json
import random

import open_clip
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

from mgllava.config import ZooConfig
from mgllava.shapes.zoo import LOCAL_DIR_PREFIX, build_clip, build_convnext, build_llm


def test_llm_and_tokenizer_round_trip(tiny_world, tmp_path):
    model, report = build_llm(tmp_path / "llm", tiny_world, max_length=512, layers=2, instruct_steps=20,
                              option_share=0.4, lookup_share=0.2)
    assert report["text_loss"][1] < report["text_loss"][0], "text pretraining of the tiny LLM should lower its loss"
    assert report["instruct_loss"][1] < report["instruct_loss"][0], "instruction tuning should lower the answer loss"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    assert reloaded.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    ids = tokenizer("USER: Is there a red circle? ASSISTANT:yes</s>", return_tensors="pt").input_ids
    assert ids[0, -1].item() == tokenizer.eos_token_id  # "</s>" is the EOS special token
    assert tokenizer.pad_token_id is not None and tokenizer.bos_token_id is not None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_bf16_instruction_tuning_multiplies_in_bf16_with_eager_attention_and_keeps_fp32_weights(tiny_world):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mgllava.shapes.zoo import instruction_tune_on_text, train_tokenizer

    tokenizer = train_tokenizer(tiny_world)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=tokenizer.pad_token_id))
    seen = []  # (dtype of a projection's output, the attention kernel) at each forward
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: seen.append((output.dtype, model.config._attn_implementation)))
    losses = instruction_tune_on_text(model, tokenizer, tiny_world, "vicuna_v1", steps=3, batch_size=4,
                                      option_share=0.5, precision="bf16")
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # no NaN
    assert seen and set(seen) == {(torch.bfloat16, "eager")}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"  # given back for whoever uses the model next
    seen.clear()
    instruction_tune_on_text(model, tokenizer, tiny_world, "vicuna_v1", steps=1, batch_size=4)
    assert set(seen) == {(torch.float32, "sdpa")}


def test_answer_loss_of_groups_padded_apart_equals_one_batch_padded_together():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mgllava.model.processing_mgllava import pad_text
    from mgllava.shapes.zoo import answer_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
    rng = random.Random(0)

    def row(prompt: int, answer: int) -> dict[str, list[int]]:
        ids = [rng.randrange(1, 50) for _ in range(prompt + answer)]
        return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}

    short = [row(5, 2), row(7, 2), row(4, 2)]
    long = [row(40, 12), row(55, 3)]
    with torch.no_grad():
        together = model(**pad_text(short + long, pad_token_id=0)).loss
        apart = answer_loss(model, [short, long], pad_token_id=0)
        naive = (model(**pad_text(short, 0)).loss + model(**pad_text(long, 0)).loss) / 2
    assert torch.allclose(apart, together, atol=1e-5)
    assert not torch.allclose(naive, together, atol=1e-3)  # the groups weigh by their answer tokens
    rounded = pad_text(long, pad_token_id=0, pad_to_multiple_of=32)  # as answer_loss pads each group
    assert rounded["input_ids"].shape == (2, 64) and torch.equal(rounded["input_ids"][:, :58],
                                                                 pad_text(long, pad_token_id=0)["input_ids"])


def test_clip_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_clip(tmp_path / "clip", image_size=112)
    reloaded = CLIPVisionModel.from_pretrained(tmp_path / "clip")
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "clip")
    assert processor.crop_size == {"height": 112, "width": 112}
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        a = model(pixels, output_hidden_states=True).hidden_states[-2]
        b = reloaded(pixels, output_hidden_states=True).hidden_states[-2]
    assert a.shape == (2, 1 + 8 * 8, 64) and torch.equal(a, b)


def test_convnext_round_trip_through_open_clip_local_dir(tmp_path):
    torch.manual_seed(0)
    model = build_convnext(tmp_path / "convnext", image_size=256)
    config = json.loads((tmp_path / "convnext" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "convnext_atto"
    reloaded = open_clip.create_model(LOCAL_DIR_PREFIX + str(tmp_path / "convnext"))
    pixels = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        a = model.visual.trunk.forward_intermediates(pixels, intermediates_only=True)
        b = reloaded.visual.trunk.forward_intermediates(pixels, intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in a] == [(40, 64, 64), (80, 32, 32), (160, 16, 16), (320, 8, 8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_build_zoo_is_idempotent(tiny_zoo, caplog):
    from mgllava.shapes.zoo import build_zoo

    settings = json.loads((tiny_zoo / "zoo.json").read_text())
    before = (tiny_zoo / "llm" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        build_zoo(tiny_zoo, settings["world"], settings["high_res"], settings["low_res"], settings["max_length"],
                  ZooConfig(**{key: settings[key] for key in ZooConfig.model_fields}))
    assert "skipping" in caplog.text
    assert (tiny_zoo / "llm" / "model.safetensors").stat().st_mtime_ns == before


def test_object_crops_centre_each_box_in_its_window():
    from mgllava.shapes.towers import CLASSES, object_crops, render_scenes

    scenes = render_scenes(3, "test/crops", 256, mean=(0.5,) * 3, std=(0.5,) * 3)
    crops, boxes, classes = object_crops(scenes, crop=96, rng=random.Random(0))
    n_objects = sum(len(b) for b in scenes.boxes)
    assert crops.shape == (n_objects, 3, 96, 96) and boxes.shape == (n_objects, 4) and len(classes) == n_objects
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert ((centres - 48).abs() <= 96 / 8 + 1).all()  # jittered by at most crop / 8
    assert classes.max() < len(CLASSES)
    # the window shows the object: its box area differs from the padding (zeros after normalisation)
    x1, y1, x2, y2 = boxes[0].round().int().tolist()
    assert crops[0, :, y1:y2, x1:x2].abs().sum() > 0


def test_zoo_reports_the_towers_held_out_accuracy(tiny_zoo):
    towers = json.loads((tiny_zoo / "zoo.json").read_text())["towers"]
    for name in ("convnext_color_acc", "convnext_shape_acc", "convnext_class_acc"):
        assert 0.0 <= towers[name] <= 1.0
    assert towers["clip_distill_r2"] <= 1.0


def test_text_pretraining_reads_one_conversation_per_image(tmp_path):
    from mgllava.shapes.world import generate_world
    from mgllava.shapes.zoo import _world_conversations

    one = generate_world(tmp_path / "one", n_images=8, progress=False)
    three = generate_world(tmp_path / "three", n_images=8, progress=False, conversations_per_image=3)
    assert len(json.loads((three / "instruct.json").read_text())) == 3 * len(
        json.loads((one / "instruct.json").read_text())
    )
    assert _world_conversations(three, describe_images=True) == _world_conversations(one, describe_images=True)


def _answering(tokenizer, answer: str, length: int):
    """Model output whose answer-position logits put ``answer``'s first token on top."""
    from types import SimpleNamespace

    logits = torch.zeros(1, length, len(tokenizer))
    logits[0, -1, tokenizer(answer, add_special_tokens=False)["input_ids"][0]] = 1.0
    return SimpleNamespace(logits=logits)


def test_caption_reading_scores_a_perfect_reader_at_one_and_a_yes_sayer_at_chance(tiny_world, tiny_zoo):
    import re

    from mgllava.shapes.world import questions as q
    from mgllava.shapes.world.generate import load_annotations
    from mgllava.shapes.zoo import caption_reading

    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "llm")
    scenes = {q.caption(ann): ann for ann in load_annotations(tiny_world, "bench")}

    def mc_answer(ann: dict, question: str) -> str:  # what the caption says, worked out from its scene
        objects = ann["objects"]
        if match := re.fullmatch(r"What color is the (\w+)\?", question):
            return next(o["color"] for o in objects if o["shape"] == match[1])
        if match := re.fullmatch(r"What shape is the (\w+) object\?", question):
            return next(o["shape"] for o in objects if o["color"] == match[1])
        if match := re.fullmatch(r"How many (\w+)s are there in the image\?", question):
            return str(sum(o["shape"] == match[1] for o in objects))
        return q.referring_expression(min(objects, key=lambda o: o["box"][0] + o["box"][2]), objects)

    def perfect_reader(input_ids):  # reads the caption as a string
        text = tokenizer.decode(input_ids[0])
        caption, question = text.split("USER: ", 1)[1].split("\n")[:2]
        if match := re.search(r"Is there an? (\w+) (\w+) in the image\?", question):
            answer = "yes" if " ".join(match.groups()) in caption else "no"
        elif match := re.search(r"Is the (\w+) (\w+) or (\w+)\?", question):
            shape, first, second = match.groups()
            answer = first if f"{first} {shape}" in caption else second
        else:
            right = mc_answer(scenes[caption], question.split(f" {q.MC_OPTIONS_HEADER}")[0])
            answer = re.search(rf"^([ABCD])\. {right}$", text, re.MULTILINE)[1]
        return _answering(tokenizer, answer, input_ids.shape[1])

    def yes_sayer(input_ids):
        return _answering(tokenizer, "yes", input_ids.shape[1])

    def a_sayer(input_ids):
        return _answering(tokenizer, "A", input_ids.shape[1])

    assert caption_reading(perfect_reader, tokenizer, tiny_world, n=40) == {
        "existence_acc": 1.0, "choice_acc": 1.0, "mc_acc": 1.0, "n": 40
    }
    assert caption_reading(yes_sayer, tokenizer, tiny_world, n=40)["existence_acc"] == 0.5
    assert caption_reading(a_sayer, tokenizer, tiny_world, n=40)["mc_acc"] == 0.25


def test_zoo_reports_how_its_llm_reads_a_caption(tiny_zoo):
    llm = json.loads((tiny_zoo / "zoo.json").read_text())["llm"]
    reading = llm["caption_reading"]
    assert reading == llm["caption_reading_pretrained"] and llm["instruct_loss"] is None  # the fixture's zoo: no tuning
    assert reading["n"] == 200 and all(0.0 <= reading[k] <= 1.0 for k in ("existence_acc", "choice_acc", "mc_acc"))


def test_the_tokenizer_does_not_change_when_a_template_is_added(tiny_world, monkeypatch):
    """The kit's tokenizer is trained on a fixed list of templates, so the tiny model it feeds is
    reproducible across template additions."""
    from dataclasses import replace

    from mgllava import templates
    from mgllava.shapes.zoo import train_tokenizer

    before = train_tokenizer(tiny_world).get_vocab()
    added = replace(templates.TEMPLATES["vicuna"], name="added", instruction="<<ADDED>> {input} <<REPLY>>")
    monkeypatch.setitem(templates.TEMPLATES, "added", added)
    assert train_tokenizer(tiny_world).get_vocab() == before


@pytest.mark.slow
def test_zoo_builds_in_a_child_process_beside_this_one(tiny_world, tmp_path):
    from conftest import tiny_overrides

    from mgllava.config import load_config
    from mgllava.shapes import BackgroundZoo, zoo_pending

    zoo_dir = tmp_path / "zoo"
    config = load_config(overrides=[*tiny_overrides(tiny_world, zoo_dir, tmp_path / "work"),
                                    "shapes.zoo.llm_layers=1", "shapes.zoo.llm_instruct_steps=0",
                                    "shapes.zoo.tower_scenes=0"])
    assert zoo_pending(config)
    with BackgroundZoo(config, threads=1, later_threads=2) as zoo:
        assert zoo.running  # the LLM trains in the child while this process is free
        assert zoo.result() == str(zoo_dir)  # the towers here, then zoo.json
    assert AutoModelForCausalLM.from_pretrained(zoo_dir / "llm").config.num_hidden_layers == 1
    assert CLIPVisionModel.from_pretrained(zoo_dir / "clip").config.image_size == 112
    assert not zoo_pending(config)
    with BackgroundZoo(config, threads=1, later_threads=2) as again:
        assert not again.running and again.result() == str(zoo_dir)  # built: no child, nothing redone


def test_zoo_child_moves_to_more_threads_on_the_signal():
    import logging
    import os
    import signal

    from mgllava.shapes import _zoo_child_setup

    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGUSR1)
    logger = logging.getLogger("mgllava")
    handlers, level = list(logger.handlers), logger.level
    try:
        _zoo_child_setup(1, 2, None)
        assert torch.get_num_threads() == 1
        os.kill(os.getpid(), signal.SIGUSR1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGUSR1, handler)
        logger.handlers[:] = handlers
        logger.setLevel(level)
