"""Chat templates: segments put the loss on assistant replies only, for every family."""

from __future__ import annotations

import pytest

from mgllava.templates import TEMPLATES, get_template

TURNS = [("human", "<image>\nIs there a red circle?"), ("gpt", "Yes."), ("human", "How many?"), ("gpt", "Two.")]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_only_assistant_replies_are_trainable(name):
    template = get_template(name)
    segments = template.render(TURNS)
    trained = [s.text for s in segments if s.trainable]
    assert trained == ["Yes." + template.assistant_suffix, "Two." + template.assistant_suffix]
    untrained = "".join(s.text for s in segments if not s.trainable)
    assert "<image>\nIs there a red circle?" in untrained and "How many?" in untrained
    assert all(stop in template.assistant_suffix or stop not in trained[0] for stop in template.stop_words)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt_ends_with_assistant_prefix(name):
    template = get_template(name)
    prompt = template.prompt(TURNS[:1])
    assert prompt.endswith(template.assistant_prefix)
    assert prompt == "".join(s.text for s in template.render(TURNS + [("human", "x")])[:2]) or prompt


def test_vicuna_v1_text_matches_llava():
    text = "".join(s.text for s in get_template("vicuna_v1").render(TURNS[:2]))
    assert text.endswith("USER: <image>\nIs there a red circle? ASSISTANT:Yes.</s>")
    assert text.startswith("A chat between a curious user and an artificial intelligence assistant.")


def test_malformed_conversations_are_rejected():
    template = get_template("vicuna_v1")
    with pytest.raises(ValueError, match="alternate"):
        template.render([("gpt", "hello")])
    with pytest.raises(ValueError, match="unknown role"):
        template.render([("system", "hello")])
    with pytest.raises(KeyError, match="unknown chat template"):
        get_template("alpaca")
