"""Questions, answers and captions about one annotated image of the shapes world.

Every function here reads an annotation record (one line of
``annotations.jsonl``, see :mod:`mgllava.shapes.world.generate`) and, where it makes
a choice, a :class:`random.Random`; so corpora and benchmarks built from them
are deterministic. A generator returns ``None`` when its kind of question has
no unambiguous answer for that image (e.g. "What color is the circle?" when
there are two circles).

Answers are short and lower-case ("yes", "red", "3", "left", "4821"), which is
what the stock lmms-eval tasks compare against.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from mgllava.shapes.world.render import COLORS, SHAPES

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
"""The post-prompt of lmms-eval's POPE, GQA and TextVQA tasks."""

MC_OPTIONS_HEADER = "There are several options:"
"""How lmms-eval's MMBench evaluator introduces the options."""

MC_ANSWER_PROMPT = "Answer with the option's letter from the given choices directly."
"""The post-prompt of lmms-eval's MMBench tasks."""

POPE_STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")
"""How the absent (colour, shape) pair of a negative existence question is chosen, after POPE:
``random``: any absent pair; ``popular``: a shape that *is* in the image, in a colour it does not have
there; ``adversarial``: a colour and a shape that are both in the image, but never together."""

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


SIZE_ORDER: tuple[str, ...] = ("small", "medium", "large")
"""The size classes of :data:`~mgllava.shapes.world.render.SIZE_RANGES`, smallest first."""


@dataclass(frozen=True)
class QA:
    """One question with its short answer; ``kind`` names the generator, ``choices`` the
    candidate answers of a multiple-choice version (the correct one included), if it has one,
    ``full`` the answer as a sentence (GQA's ``fullAnswer``), and ``size`` the size class of the
    object asked about (:func:`smallest` of them when the answer needs several; None when it is
    about no shape in the image: an absent one, or the number)."""

    question: str
    answer: str
    kind: str
    choices: tuple[str, ...] | None = None
    full: str | None = None
    size: str | None = None

    @property
    def small_text(self) -> bool:
        """Whether answering means reading the small rendered number."""
        return self.kind == "text"


def smallest(objects: list[dict]) -> str | None:
    """The smallest size class among ``objects`` (None for none, or none with a size)."""
    return min((o["size"] for o in objects if o.get("size")), key=SIZE_ORDER.index, default=None)


def _a(word: str) -> str:
    """``word`` with its indefinite article: "a red", "an orange"."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _center(obj: dict) -> tuple[float, float]:
    x1, y1, x2, y2 = obj["box"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def referring_expression(obj: dict, objects: list[dict]) -> str | None:
    """The shortest of "red circle" / "large red circle" that singles ``obj`` out, else None."""
    same_kind = [o for o in objects if (o["color"], o["shape"]) == (obj["color"], obj["shape"])]
    if len(same_kind) == 1:
        return f"{obj['color']} {obj['shape']}"
    if sum(o["size"] == obj["size"] for o in same_kind) == 1:
        return f"{obj['size']} {obj['color']} {obj['shape']}"
    return None


def position_phrase(box: list[int], width: int, height: int) -> str:
    """Where a box lies on a 3 x 3 grid over the image, e.g. "in the top left", "on the right"."""
    x1, y1, x2, y2 = box
    col = min(2, int(3 * (x1 + x2) / 2 / width))
    row = min(2, int(3 * (y1 + y2) / 2 / height))
    names = (
        ("in the top left", "at the top", "in the top right"),
        ("on the left", "in the center", "on the right"),
        ("in the bottom left", "at the bottom", "in the bottom right"),
    )
    return names[row][col]


def caption(ann: dict) -> str:
    """A one- or two-sentence description listing every shape left to right, and the number if any."""
    objects = sorted(ann["objects"], key=lambda o: (_center(o), o["shape"]))
    parts = [
        f"a {o['size']} {o['color']} {o['shape']} {position_phrase(o['box'], ann['width'], ann['height'])}"
        for o in objects
    ]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(objects)
    text = f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''} on a light background: {listed}."
    if ann["text"] is not None:
        where = position_phrase(ann["text_box"], ann["width"], ann["height"])
        text += f" The number {ann['text']} is written {where}."
    return text


def absent_pair(rng: random.Random, ann: dict, strategy: str) -> tuple[str, str]:
    """A (colour, shape) pair not in the image, chosen after one of :data:`POPE_STRATEGIES`."""
    present = {(o["color"], o["shape"]) for o in ann["objects"]}
    absent = [(c, s) for s in SHAPES for c in COLORS if (c, s) not in present]
    shapes = {s for _, s in present}
    colors = {c for c, _ in present}
    popular = [(c, s) for c, s in absent if s in shapes]
    adversarial = [(c, s) for c, s in popular if c in colors]
    if strategy == "adversarial" and adversarial:
        return rng.choice(adversarial)
    if strategy in ("adversarial", "popular") and popular:
        return rng.choice(popular)
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    return rng.choice(absent)


def existence(rng: random.Random, ann: dict, present: bool, strategy: str = "random") -> QA:
    """ "Is there a red circle in the image?" ("an orange ..."), about a pair that is there (``present``) or not."""
    if present:
        color, shape = rng.choice(sorted({(o["color"], o["shape"]) for o in ann["objects"]}))
    else:
        color, shape = absent_pair(rng, ann, strategy)
    full = f"Yes, there is {_a(color)} {shape}." if present else f"No, there is no {color} {shape}."
    asked = [o for o in ann["objects"] if (o["color"], o["shape"]) == (color, shape)]
    return QA(
        f"Is there {_a(color)} {shape} in the image?", "yes" if present else "no", "existence", full=full,
        size=smallest(asked),
    )


def color_of(rng: random.Random, ann: dict) -> QA | None:
    """ "What color is the circle?" for a shape that occurs exactly once."""
    counts = Counter(o["shape"] for o in ann["objects"])
    unique = [o for o in ann["objects"] if counts[o["shape"]] == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    full = f"The {obj['shape']} is {obj['color']}."
    return QA(f"What color is the {obj['shape']}?", obj["color"], "color", COLORS, full, obj["size"])


def shape_of(rng: random.Random, ann: dict) -> QA | None:
    """ "What shape is the red object?" for a colour that occurs exactly once."""
    counts = Counter(o["color"] for o in ann["objects"])
    unique = [o for o in ann["objects"] if counts[o["color"]] == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    full = f"The {obj['color']} object is {_a(obj['shape'])}."
    return QA(f"What shape is the {obj['color']} object?", obj["shape"], "shape", SHAPES, full, obj["size"])


def choice(rng: random.Random, ann: dict) -> QA | None:
    """ "Is the circle red or blue?" (GQA's "choose" questions), about a shape that occurs exactly
    once; the other colour is drawn from the rest, and the order of the two is random."""
    counts = Counter(o["shape"] for o in ann["objects"])
    unique = [o for o in ann["objects"] if counts[o["shape"]] == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    options = [obj["color"], rng.choice([c for c in COLORS if c != obj["color"]])]
    rng.shuffle(options)
    question = f"Is the {obj['shape']} {options[0]} or {options[1]}?"
    return QA(question, obj["color"], "choice", full=f"The {obj['shape']} is {obj['color']}.", size=obj.get("size"))


def count(rng: random.Random, ann: dict) -> QA:
    """ "How many circles are there in the image?" (mostly about a shape that is there)."""
    present = sorted({o["shape"] for o in ann["objects"]})
    shape = rng.choice(present) if rng.random() < 0.85 else rng.choice(SHAPES)
    counted = [o for o in ann["objects"] if o["shape"] == shape]
    return QA(f"How many {shape}s are there in the image?", str(len(counted)), "count",
              tuple(str(k) for k in range(7)), size=smallest(counted))


def relation(rng: random.Random, ann: dict) -> QA | None:
    """ "Is the red circle to the left or to the right of the blue star?" (or above/below), for two
    objects that can be named unambiguously and are clearly apart along the asked axis."""
    objects = ann["objects"]
    named = [(o, r) for o in objects if (r := referring_expression(o, objects)) is not None]
    pairs = []
    for a, ra in named:
        for b, rb in named:
            if a is b:
                continue
            (ax, ay), (bx, by) = _center(a), _center(b)
            dx, dy = ax - bx, ay - by
            if abs(dx) >= max(12.0, 2 * abs(dy)):
                side = "left" if dx < 0 else "right"
                question = f"Is the {ra} to the left or to the right of the {rb}?"
                pairs.append((question, side, f"The {ra} is to the {side} of the {rb}.", smallest([a, b])))
            elif abs(dy) >= max(12.0, 2 * abs(dx)):
                side = "above" if dy < 0 else "below"
                pairs.append((f"Is the {ra} above or below the {rb}?", side, f"The {ra} is {side} the {rb}.",
                              smallest([a, b])))
    if not pairs:
        return None
    question, answer, full, size = rng.choice(pairs)
    return QA(question, answer, "relation", full=full, size=size)


def leftmost(rng: random.Random, ann: dict) -> QA | None:
    """ "Which object is furthest to the left?" when one clearly is; the choices are the names of the
    other objects in the image and of absent shapes (always four in all)."""
    objects = ann["objects"]
    ordered = sorted(objects, key=lambda o: _center(o)[0])
    name = referring_expression(ordered[0], objects)
    if name is None or (len(ordered) > 1 and _center(ordered[1])[0] - _center(ordered[0])[0] < 8):
        return None
    others = sorted({r for o in ordered[1:] if (r := referring_expression(o, objects)) is not None})
    fillers = [f"{c} {s}" for s in SHAPES for c in COLORS if f"{c} {s}" not in others and f"{c} {s}" != name]
    distractors = rng.sample(others, min(3, len(others)))
    distractors += rng.sample(fillers, 3 - len(distractors))
    return QA("Which object is furthest to the left?", name, "leftmost", (name, *distractors), size=ordered[0]["size"])


def read_text(rng: random.Random, ann: dict) -> QA | None:
    """ "What number is written in the image?" for an image that carries a number."""
    text = ann["text"]
    if text is None:
        return None
    question = rng.choice(
        (
            "What number is written in the image?",
            "What is the number shown in the image?",
            "Which number is printed in the picture?",
            "What number can you read in the image?",
        )
    )
    lo, hi = 10 ** (len(text) - 1), 10 ** len(text) - 1
    wrong = sorted({str(rng.randint(lo, hi)) for _ in range(12)} - {text})
    return QA(question, text, "text", (text, *wrong[:3]))


def last_digit(rng: random.Random, ann: dict) -> QA | None:
    """ "What is the last digit of the number written in the image?" for an image with a number."""
    if ann["text"] is None:
        return None
    return QA("What is the last digit of the number written in the image?", ann["text"][-1], "text")


def multiple_choice(
    rng: random.Random, qa: QA, letter: str | None = None
) -> tuple[dict[str, str], str] | None:
    """Four options ``{"A": ..., "D": ...}``: the answer (at ``letter``, else at a random place) and
    three random wrong choices; returns them with the answer's letter, or None if ``qa`` has
    fewer than three wrong choices."""
    if qa.choices is None:
        return None
    wrong = [c for c in qa.choices if c != qa.answer]
    if len(wrong) < 3:
        return None
    options = rng.sample(wrong, 3)
    position = "ABCD".index(letter) if letter is not None else rng.randrange(4)
    options.insert(position, qa.answer)
    return dict(zip("ABCD", options, strict=True)), "ABCD"[position]


MC_GENERATORS = (color_of, shape_of, count, leftmost)
"""The question kinds that have four or more choices, asked as four-option questions."""


def four_option_question(rng: random.Random, ann: dict, letter: str | None = None) -> tuple[str, str] | None:
    """A four-option question about ``ann`` of a random :data:`MC_GENERATORS` kind, worded as
    MMBench's (:func:`mc_prompt`), with its answer's letter (``letter`` if given); None when
    that kind has no unambiguous answer for the image."""
    qa = rng.choice(MC_GENERATORS)(rng, ann)
    mc = multiple_choice(rng, qa, letter) if qa is not None else None
    if mc is None:
        return None
    options, answer_letter = mc
    return mc_prompt(qa.question, options), answer_letter


def letter_lookup(rng: random.Random) -> tuple[str, str]:
    """ "Which option is red?" over four colours (or four shapes), worded as MMBench's, with the
    letter of the option asked for: the bare binding of an answer to its letter, with no scene."""
    words = rng.sample(COLORS if rng.random() < 0.5 else SHAPES, 4)
    position = rng.randrange(4)
    return mc_prompt(f"Which option is {words[position]}?", dict(zip("ABCD", words, strict=True))), "ABCD"[position]


def mc_prompt(question: str, options: dict[str, str]) -> str:
    """A multiple-choice question worded exactly as lmms-eval's MMBench task shows it (without a hint)."""
    listed = "\n".join(f"{k}. {v}" for k, v in options.items())
    return f"{question} {MC_OPTIONS_HEADER}\n{listed}\n\n{MC_ANSWER_PROMPT}"
