"""Chat templates for the LLM families MG-LLaVA is trained on.

A template turns a conversation into *segments*: text, or the tokenizer's BOS/EOS
token, each flagged as trainable or not, so that training tokenises segment by
segment and puts the loss only on the assistant's words and what closes them.

The model is XTuner's prompt templates, which the published MG-LLaVA trains and
evaluates with (its ``encode_fn``). Each answered turn is::

    [BOS] system? instruction(input)   no loss; BOS when the previous turn ended with EOS
    answer + suffix                    loss
    [EOS]                              loss, unless the suffix is the end-of-turn marker
    sep                                no loss

and a generation prompt is the same up to the last instruction. The system block is
its own segment, written once before the first instruction. The text of each
segment is tokenised on its own, as the reference does.

Templates (SPEC section 6):

- the reference's, as its shipped configs use them: ``vicuna`` (Vicuna-1.5 7B/13B),
  ``phi3_chat`` (Phi-3), ``llama3_chat`` (Llama-3 Instruct), ``qwen_chat`` (Yi-1.5-Chat);
  no system prompt, as in those configs;
- the LLaVA-v1 conversation style with a system prompt and one BOS: ``vicuna_v1``
  (the tiny preset's; its LLM is instruction-tuned in it by ``mgllava zoo``),
  ``phi3``, ``llama3``, ``chatml``.

:func:`llava_turns` prepares a LLaVA conversation the way the reference's
``llava_map_fn`` does before the template applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

HUMAN, ASSISTANT = "human", "gpt"  # role names of LLaVA's conversation JSON
IMAGE_PLACEHOLDER = "<image>"
BOS, EOS = "bos", "eos"  # Segment.special: the tokenizer's BOS / EOS token


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool  # True on assistant replies and what closes them
    special: str | None = None  # BOS or EOS: the tokenizer's token of that name (text is "")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    instruction: str  # one human turn: "{input}" marks its text; ends where the assistant's answer starts
    stop_words: tuple[str, ...]
    system: str = ""  # written once before the first instruction ("" for none)
    suffix: str = ""  # written after each answer, trained
    suffix_as_eos: bool = False  # the suffix ends the turn: no EOS token after it, no BOS before the next turn
    sep: str = ""  # after each answered turn, not trained

    def render(self, turns: list[tuple[str, str]], add_generation_prompt: bool = False) -> list[Segment]:
        """Render ``[(role, text), ...]`` (roles ``human``/``gpt``, alternating, human first) as segments.

        A trailing human turn without an answer is dropped, unless ``add_generation_prompt``:
        then the conversation must end with a human turn and the result ends with its
        instruction, ready for ``generate``.
        """
        for index, (role, _) in enumerate(turns):
            if role not in (HUMAN, ASSISTANT):
                raise ValueError(f"unknown role {role!r}; expected {HUMAN!r} or {ASSISTANT!r}")
            if role != (HUMAN, ASSISTANT)[index % 2]:
                raise ValueError("a conversation must alternate human and gpt turns, starting with human")
        if add_generation_prompt and (not turns or turns[-1][0] != HUMAN):
            raise ValueError("add_generation_prompt needs a conversation that ends with a human turn")
        segments = []
        for index in range(0, len(turns), 2):
            answered = index + 1 < len(turns)
            if not answered and not add_generation_prompt:
                break
            if index == 0 or not self.suffix_as_eos:
                segments.append(Segment("", False, BOS))
            if index == 0 and self.system:
                segments.append(Segment(self.system, False))
            segments.append(Segment(self.instruction.format(input=turns[index][1]), False))
            if answered:
                segments.append(Segment(turns[index + 1][1] + self.suffix, True))
                if not self.suffix_as_eos:
                    segments.append(Segment("", True, EOS))
                if self.sep:
                    segments.append(Segment(self.sep, False))
        return segments

    def tokenize(
        self,
        encode: Callable[[list[str]], list[list[int]]],
        turns: list[tuple[str, str]],
        bos_token_id: int | None = None,
        add_generation_prompt: bool = False,
        ignore_index: int = -100,
        eos_token_id: int | None = None,
    ) -> tuple[list[int], list[int]]:
        """``input_ids`` and ``labels`` of a conversation, each text segment tokenised on its own:
        ``encode(texts)`` returns each text's ids (one call per conversation, which a fast tokenizer
        runs as one batch). Labels repeat the ids on trainable segments and are ``ignore_index``
        elsewhere. A tokenizer without a BOS token (``bos_token_id`` None) gets none; a template
        that closes answers with EOS needs ``eos_token_id``."""
        segments = self.render(turns, add_generation_prompt=add_generation_prompt)
        if eos_token_id is None and any(segment.special == EOS for segment in segments):
            raise ValueError(f"chat template {self.name!r} ends each answer with the tokenizer's EOS "
                             "token, and this tokenizer has none")
        encoded = iter(encode([segment.text for segment in segments if segment.special is None]))
        input_ids: list[int] = []
        labels: list[int] = []
        for segment in segments:
            if segment.special == BOS:
                ids = [] if bos_token_id is None else [bos_token_id]
            elif segment.special == EOS:
                ids = [eos_token_id]
            else:
                ids = next(encoded)
            input_ids += ids
            labels += ids if segment.trainable else [ignore_index] * len(ids)
        return input_ids, labels

    def prompt(self, turns: list[tuple[str, str]]) -> str:
        """The text to feed ``generate`` for a conversation ending with a human turn (BOS not written)."""
        return "".join(s.text for s in self.render(turns, add_generation_prompt=True))


def llava_turns(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A LLaVA conversation as the reference's ``llava_map_fn`` prepares it: leading assistant turns
    dropped, and in a human turn holding one ``<image>`` the placeholder moved to its start:
    ``"<image>\\n"`` + the rest of the text, stripped (LLaVA-Pretrain captions often end with it).
    A turn with several placeholders (a multi-image record, which the reference cannot train)
    keeps them where they are."""
    start = 0
    while start < len(turns) and turns[start][0] == ASSISTANT:
        start += 1
    prepared = []
    for role, text in turns[start:]:
        if role == HUMAN and text.count(IMAGE_PLACEHOLDER) == 1:
            text = (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        prepared.append((role, text))
    return prepared


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        # the reference's (XTuner PROMPT_TEMPLATE entries of the same names)
        ChatTemplate(name="vicuna", instruction="USER: {input} ASSISTANT:", sep="\n", stop_words=()),
        ChatTemplate(
            name="phi3_chat",
            instruction="<|user|>{input}<|end|>\n<|assistant|>\n",
            suffix="<|end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|end|>",),
        ),
        ChatTemplate(
            name="llama3_chat",
            instruction="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            suffix="<|eot_id|>",
            suffix_as_eos=True,
            stop_words=("<|eot_id|>",),
        ),
        ChatTemplate(
            name="qwen_chat",
            instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
            suffix="<|im_end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|im_end|>", "<|endoftext|>"),
        ),
        # LLaVA-v1 style: a system prompt, one BOS, the end-of-turn marker written as text
        ChatTemplate(
            name="vicuna_v1",
            system=_VICUNA_SYSTEM + " ",
            instruction="USER: {input} ASSISTANT:",
            suffix="</s>",
            suffix_as_eos=True,
            stop_words=("</s>",),
        ),
        ChatTemplate(
            name="phi3",
            instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
            suffix="<|end|>\n",
            suffix_as_eos=True,
            stop_words=("<|end|>", "<|endoftext|>"),
        ),
        ChatTemplate(
            name="llama3",
            system="<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>",
            instruction="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            suffix="<|eot_id|>",
            suffix_as_eos=True,
            stop_words=("<|eot_id|>", "<|end_of_text|>"),
        ),
        ChatTemplate(
            name="chatml",
            system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
            instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
            suffix="<|im_end|>\n",
            suffix_as_eos=True,
            stop_words=("<|im_end|>", "<|endoftext|>"),
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; choose one of: {', '.join(TEMPLATES)}") from None
