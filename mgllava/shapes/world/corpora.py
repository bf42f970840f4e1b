"""LLaVA-format training corpora of the shapes world: captions and multi-turn instructions.

Both are lists of ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}``
with ``image`` relative to the world's image root (``OUT/images``) and ``<image>``
at the start of the first human turn only, as in LLaVA-Pretrain / LLaVA-Instruct.
They are built from the train split's annotations only.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mgllava.shapes.world import questions as q

CAPTION_REQUESTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
"""The brief-description requests of LLaVA-Pretrain."""

_Generator = Callable[[random.Random, dict], q.QA | None]
_GENERATORS: tuple[_Generator, ...] = (q.color_of, q.shape_of, q.count, q.relation, q.leftmost, q.last_digit)


def _turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def _image_id(ann: dict) -> str:
    return ann["image"].rsplit(".", 1)[0].replace("/", "_")


def build_pretrain(annotations: list[dict], seed: int) -> list[dict]:
    """One caption conversation per image, with a request drawn from :data:`CAPTION_REQUESTS`."""
    records = []
    for ann in annotations:
        rng = random.Random(f"{seed}/pretrain/{ann['image']}")
        records.append(
            {
                "id": _image_id(ann),
                "image": ann["image"],
                "conversations": [
                    _turn("human", "<image>\n" + rng.choice(CAPTION_REQUESTS)),
                    _turn("gpt", q.caption(ann)),
                ],
            }
        )
    return records


def _instruction_pairs(rng: random.Random, ann: dict) -> list[tuple[str, str]]:
    """7-9 (prompt, answer) pairs: four existence questions (two about objects that are there,
    two about ones that are not, the POPE kinds), two "choose" questions, the number if there
    is one (most of the time), then other kinds; about one in five as multiple choice.

    In the choose questions ("Is the circle red or blue?") the answer is a word of the question
    (why they are in the mix: docs/findings.md)."""
    qas = [
        q.existence(rng, ann, present=present, strategy=rng.choice(q.POPE_STRATEGIES))
        for present in (True, True, False, False)
    ]
    qas += [qa for _ in range(2) if (qa := q.choice(rng, ann)) is not None]
    text_qa = q.read_text(rng, ann)
    if text_qa is not None and rng.random() < 0.8:
        qas.append(text_qa)
    others = [qa for gen in _GENERATORS if (qa := gen(rng, ann)) is not None]
    rng.shuffle(others)
    qas = (qas + others)[: 6 + rng.randint(1, 3)]
    rng.shuffle(qas)
    pairs = []
    for qa in qas:
        mc = q.multiple_choice(rng, qa) if rng.random() < 0.2 else None
        if mc is not None:
            options, letter = mc
            pairs.append((q.mc_prompt(qa.question, options), letter))
        else:
            pairs.append((f"{qa.question}\n{q.SHORT_ANSWER_PROMPT}", qa.answer))
    return pairs


def build_instruct(annotations: list[dict], seed: int, per_image: int = 1) -> list[dict]:
    """``per_image`` multi-turn question-answering conversations per image, each with its own
    questions (see :func:`_instruction_pairs`); ids ``<image id>``, then ``<image id>_1``, ...
    Records come image by image for the first conversation, then again for the second, ..."""
    records = []
    for k in range(per_image):
        for ann in annotations:
            rng = random.Random(f"{seed}/instruct/{ann['image']}" + (f"/{k}" if k else ""))
            conversations = []
            for i, (prompt, answer) in enumerate(_instruction_pairs(rng, ann)):
                conversations.append(_turn("human", ("<image>\n" if i == 0 else "") + prompt))
                conversations.append(_turn("gpt", answer))
            record_id = _image_id(ann) + (f"_{k}" if k else "")
            records.append({"id": record_id, "image": ann["image"], "conversations": conversations})
    return records
