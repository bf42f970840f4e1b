"""Chat templates: token sequences and loss masks as the reference (XTuner's templates and encode_fn) builds them.

The expected strings are written from the reference's template definitions (xtuner/utils/templates.py:
vicuna, phi3_chat, llama3_chat, qwen_chat; xtuner/dataset/utils.py encode_fn; llava_map_fn). The
tokenizer is character-level, so each token is one character (or ``<s>``, ``</s>``) and the ids can be
read back as the rendered text.
"""

from __future__ import annotations

import string

import pytest

from mgllava.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mgllava.model.processing_mgllava import MGLLaVAProcessor
from mgllava.templates import TEMPLATES, get_template, llava_turns

# as LLaVA-Pretrain words it: the placeholder at the end of the human turn
TURNS = [("human", "Is there a red circle?\n<image>"), ("gpt", "Yes."), ("human", "How many?"), ("gpt", "Two.")]

# rendered ids | the trained tokens, one run per answer (BOS = <s>, EOS = </s>)
EXPECTED = {
    "vicuna": (
        "<s>USER: <image>\nIs there a red circle? ASSISTANT:Yes.</s>\n<s>USER: How many? ASSISTANT:Two.</s>\n",
        ["Yes.</s>", "Two.</s>"],
    ),
    "phi3_chat": (
        "<s><|user|><image>\nIs there a red circle?<|end|>\n<|assistant|>\nYes.<|end|>\n"
        "<|user|>How many?<|end|>\n<|assistant|>\nTwo.<|end|>\n",
        ["Yes.<|end|>", "Two.<|end|>"],
    ),
    "llama3_chat": (
        "<s><|start_header_id|>user<|end_header_id|>\n\n<image>\nIs there a red circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYes.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow many?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nTwo.<|eot_id|>",
        ["Yes.<|eot_id|>", "Two.<|eot_id|>"],
    ),
    "qwen_chat": (
        "<s><|im_start|>user\n<image>\nIs there a red circle?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
        "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\nTwo.<|im_end|>\n",
        ["Yes.<|im_end|>", "Two.<|im_end|>"],
    ),
    # the tiny preset's LLaVA-v1 rendering (one BOS, a system prompt, the end marker written as text)
    "vicuna_v1": (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nIs there a red circle? "
        "ASSISTANT:Yes.</s>USER: How many? ASSISTANT:Two.</s>",
        ["Yes.</s>", "Two.</s>"],
    ),
}

# the reference's evaluation prompt (MGLLaVAProxyEvalDataset: BOS + INSTRUCTION with "<image>\n" + question)
EXPECTED_PROMPT = {
    "vicuna": "<s>USER: <image>\nWhat? ASSISTANT:",
    "phi3_chat": "<s><|user|><image>\nWhat?<|end|>\n<|assistant|>\n",
    "llama3_chat": "<s><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen_chat": "<s><|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def char_tokenizer():
    """A character-level fast tokenizer with ``<s>`` (BOS), ``</s>`` (EOS) and ``<pad>``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials + list(string.printable))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _processor(tokenizer, template: str, max_text_length: int = 4096) -> MGLLaVAProcessor:
    return MGLLaVAProcessor(tokenizer, template, high_res=1, image_mean=(0.0,), image_std=(1.0,),
                            max_text_length=max_text_length)


def _shown(tokenizer, ids) -> str:
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    return "".join("<image>" if i == IMAGE_TOKEN_INDEX else tokenizer.convert_ids_to_tokens(i) for i in ids)


def _trained_runs(tokenizer, input_ids, labels) -> list[str]:
    """The trained tokens as text, one string per run of consecutive trained positions."""
    runs, previous = [], False
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token
            piece = _shown(tokenizer, [token])
            runs[-1:] = [runs[-1] + piece] if previous else [*runs[-1:], piece]
        previous = trained
    return runs


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_training_record_tokens_and_loss_mask(char_tokenizer, name):
    processor = _processor(char_tokenizer, name)
    input_ids, labels = processor._tokenize_record(TURNS, n_images=1)
    text, trained = EXPECTED[name]
    assert _shown(char_tokenizer, input_ids) == text
    assert _trained_runs(char_tokenizer, input_ids, labels) == trained
    bos, eos = char_tokenizer.bos_token_id, char_tokenizer.eos_token_id
    assert input_ids.tolist().count(bos) == text.count("<s>") and input_ids.tolist().count(eos) == text.count("</s>")


@pytest.mark.parametrize("name", sorted(EXPECTED_PROMPT))
def test_generation_prompt_is_the_reference_evaluation_prompt(char_tokenizer, name):
    prompt = _processor(char_tokenizer, name).generation_prompt("What?", with_image=True)
    assert _shown(char_tokenizer, prompt) == EXPECTED_PROMPT[name]


def test_generation_prompt_after_history_renders_the_history_as_training_does(char_tokenizer):
    processor = _processor(char_tokenizer, "vicuna")
    prompt = processor.generation_prompt("How many?", with_image=False, history=[("Red?", "Yes.")])
    assert _shown(char_tokenizer, prompt) == "<s>USER: Red? ASSISTANT:Yes.</s>\n<s>USER: How many? ASSISTANT:"


def test_each_text_the_reference_encodes_on_its_own_is_encoded_on_its_own():
    """encode_fn tokenises the instruction, the answer (+ suffix) and the separator separately:
    a tokenizer that merges across those boundaries gives the same ids only if we cut there too."""
    calls: list[str] = []

    def encode(texts: list[str]) -> list[list[int]]:  # one call per conversation, each text encoded on its own
        calls.extend(texts)
        return [[len(calls) - len(texts) + i + 1] for i in range(len(texts))]

    ids, labels = get_template("vicuna").tokenize(encode, llava_turns(TURNS), bos_token_id=1000,
                                                  eos_token_id=2000)
    assert calls == ["USER: <image>\nIs there a red circle? ASSISTANT:", "Yes.", "\n",
                     "USER: How many? ASSISTANT:", "Two.", "\n"]
    assert ids == [1000, 1, 2, 2000, 3, 1000, 4, 5, 2000, 6]
    assert labels == [-100, -100, 2, 2000, -100, -100, -100, 5, 2000, -100]


def test_llava_turns_moves_the_image_first_and_drops_leading_answers():
    turns = [("gpt", "stray"), ("human", "  Describe it briefly. <image> "), ("gpt", "A red circle.")]
    assert llava_turns(turns) == [("human", "<image>\nDescribe it briefly."), ("gpt", "A red circle.")]
    assert llava_turns([("human", "<image>"), ("gpt", "x")]) == [("human", "<image>"), ("gpt", "x")]
    assert llava_turns([("human", "No image here. "), ("gpt", "x")]) == [("human", "No image here. "), ("gpt", "x")]
    two_images = [("human", "<image> and <image>: compare."), ("gpt", "x")]
    assert llava_turns(two_images) == two_images


def test_text_is_cut_at_max_text_length_as_encode_fn_cuts(char_tokenizer):
    """Ids and labels are cut together at the text budget (here the last answer loses ".", EOS and the separator); a budget so
    short that it cuts off the image placeholder is an error naming the budget."""
    full_ids, full_labels = _processor(char_tokenizer, "vicuna")._tokenize_record(TURNS, 1)
    budget = len(full_ids) - 3
    ids, labels = _processor(char_tokenizer, "vicuna", budget)._tokenize_record(TURNS, 1)
    assert ids.tolist() == full_ids.tolist()[:budget] and labels.tolist() == full_labels.tolist()[:budget]
    assert _shown(char_tokenizer, ids).endswith("ASSISTANT:Two")
    with pytest.raises(ValueError, match="truncated to 5 tokens cut off an image placeholder"):
        _processor(char_tokenizer, "vicuna", 5)._tokenize_record(TURNS, 1)


def test_a_tokenizer_without_bos_gets_none_and_one_without_eos_is_refused():
    def encode(texts: list[str]) -> list[list[int]]:
        return [[7] * len(text) for text in texts]

    ids, _ = get_template("qwen_chat").tokenize(encode, [("human", "a"), ("gpt", "b")], bos_token_id=None)
    assert ids[0] == 7
    with pytest.raises(ValueError, match="'vicuna' ends each answer with the tokenizer's EOS"):
        get_template("vicuna").tokenize(encode, [("human", "a"), ("gpt", "b")], bos_token_id=1)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_trailing_question_without_answer_is_not_trained(name):
    template = get_template(name)
    assert template.render(TURNS + [("human", "And now?")]) == template.render(TURNS)
    assert [s.text for s in template.render(TURNS) if s.trainable and s.text] == [
        "Yes." + template.suffix, "Two." + template.suffix]


def test_malformed_conversations_are_rejected():
    template = get_template("vicuna")
    with pytest.raises(ValueError, match="alternate"):
        template.render([("gpt", "hello")])
    with pytest.raises(ValueError, match="unknown role"):
        template.render([("system", "hello")])
    with pytest.raises(ValueError, match="ends with a human turn"):
        template.render([("human", "a"), ("gpt", "b")], add_generation_prompt=True)
    with pytest.raises(KeyError, match="unknown chat template"):
        get_template("alpaca")
