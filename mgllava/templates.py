"""Chat templates for the LLM families MG-LLaVA is trained on.

A template turns a conversation into text *segments*, each flagged as trainable
or not, so that training can tokenise segment by segment and put the loss only
on the assistant's words (and the token that closes them), exactly where the
template places them.

Families (SPEC section 6): Vicuna v1 (Vicuna-1.5 7B/13B, and the tiny preset),
Phi-3, Llama-3 (Instruct) and ChatML (Yi-1.5-Chat). The tokenizer's BOS token, if it has one, is prepended by the
caller, not written here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

HUMAN, ASSISTANT = "human", "gpt"  # role names of LLaVA's conversation JSON
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool  # True on assistant replies and the end-of-turn marker after them


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str  # system block, written once before the first user turn ("" for none)
    user_prefix: str  # before each user message
    user_suffix: str  # after each user message
    assistant_prefix: str  # opens the assistant's turn (also the generation prompt)
    assistant_suffix: str  # closes the assistant's turn; trained, so the model learns to stop
    stop_words: tuple[str, ...]

    def render(self, turns: list[tuple[str, str]], add_generation_prompt: bool = False) -> list[Segment]:
        """Render ``[(role, text), ...]`` (roles ``human``/``gpt``) as segments.

        With ``add_generation_prompt`` the result ends with the assistant prefix,
        ready for ``generate``; the last turn must then be a human turn.
        """
        segments = [Segment(self.system, False)] if self.system else []
        for index, (role, text) in enumerate(turns):
            if role not in (HUMAN, ASSISTANT):
                raise ValueError(f"unknown role {role!r}; expected {HUMAN!r} or {ASSISTANT!r}")
            if role != (HUMAN, ASSISTANT)[index % 2]:
                raise ValueError("a conversation must alternate human and gpt turns, starting with human")
            if role == HUMAN:
                segments.append(Segment(self.user_prefix + text + self.user_suffix + self.assistant_prefix, False))
            else:
                segments.append(Segment(text + self.assistant_suffix, True))
        if add_generation_prompt and (not turns or turns[-1][0] != HUMAN):
            raise ValueError("add_generation_prompt needs a conversation that ends with a human turn")
        if not add_generation_prompt and turns and turns[-1][0] == HUMAN:
            # a trailing human turn has no answer to learn from: drop its assistant prefix
            last = segments[-1]
            segments[-1] = Segment(last.text[: len(last.text) - len(self.assistant_prefix)], False)
        return segments

    def tokenize(
        self,
        encode: Callable[[str], list[int]],
        turns: list[tuple[str, str]],
        bos_token_id: int | None = None,
        add_generation_prompt: bool = False,
        ignore_index: int = -100,
    ) -> tuple[list[int], list[int]]:
        """``input_ids`` and ``labels`` of a conversation, tokenised segment by segment with
        ``encode(text)``: labels repeat the ids on trainable segments and are ``ignore_index``
        elsewhere, so the loss falls on the assistant's words only; ``bos_token_id`` (if any) first."""
        input_ids = [bos_token_id] if bos_token_id is not None else []
        labels = [ignore_index] * len(input_ids)
        for segment in self.render(turns, add_generation_prompt=add_generation_prompt):
            ids = encode(segment.text)
            input_ids += ids
            labels += ids if segment.trainable else [ignore_index] * len(ids)
        return input_ids, labels

    def prompt(self, turns: list[tuple[str, str]]) -> str:
        """The text to feed ``generate`` for a conversation ending with a human turn."""
        return "".join(s.text for s in self.render(turns, add_generation_prompt=True))


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="vicuna_v1",
            system=_VICUNA_SYSTEM + " ",
            user_prefix="USER: ",
            user_suffix=" ",
            assistant_prefix="ASSISTANT:",
            assistant_suffix="</s>",
            stop_words=("</s>",),
        ),
        ChatTemplate(
            name="phi3",
            system="",
            user_prefix="<|user|>\n",
            user_suffix="<|end|>\n",
            assistant_prefix="<|assistant|>\n",
            assistant_suffix="<|end|>\n",
            stop_words=("<|end|>", "<|endoftext|>"),
        ),
        ChatTemplate(
            name="llama3",
            system="<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>",
            user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
            user_suffix="<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant_suffix="<|eot_id|>",
            stop_words=("<|eot_id|>", "<|end_of_text|>"),
        ),
        ChatTemplate(
            name="chatml",
            system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
            user_prefix="<|im_start|>user\n",
            user_suffix="<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
            assistant_suffix="<|im_end|>\n",
            stop_words=("<|im_end|>", "<|endoftext|>"),
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; choose one of: {', '.join(TEMPLATES)}") from None
