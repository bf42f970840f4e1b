"""The tiny zoo: saved in the public layouts, reloaded by the full-size loading code, identically."""

from __future__ import annotations

import json

import open_clip
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

from mgllava.zoo import LOCAL_DIR_PREFIX, build_clip, build_convnext, build_llm


def test_llm_and_tokenizer_round_trip(tiny_world, tmp_path):
    model, losses = build_llm(tmp_path / "llm", tiny_world, max_length=512)
    assert losses[-1] < losses[0], "text pretraining of the tiny LLM should lower its loss"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    ids = tokenizer("USER: Is there a red circle? ASSISTANT:yes</s>", return_tensors="pt").input_ids
    assert ids[0, -1].item() == tokenizer.eos_token_id  # "</s>" is the EOS special token
    assert tokenizer.pad_token_id is not None and tokenizer.bos_token_id is not None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


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
    from mgllava.zoo import build_zoo

    settings = json.loads((tiny_zoo / "zoo.json").read_text())
    before = (tiny_zoo / "llm" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        build_zoo(tiny_zoo, settings["world"], settings["high_res"], settings["low_res"], settings["max_length"])
    assert "skipping" in caplog.text
    assert (tiny_zoo / "llm" / "model.safetensors").stat().st_mtime_ns == before
