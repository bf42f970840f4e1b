"""Benchmark sets of the shapes world, in the schemas of lmms-eval 0.7.3's stock tasks.

Each set is a :class:`datasets.DatasetDict` saved with ``save_to_disk`` under
``OUT/bench/<name>``, built from the bench split's images only, with the split
name and the columns the stock task reads (its yaml and ``utils.py`` under
``lmms_eval/tasks/<name>/``); ``image`` is a :class:`datasets.Image` column
holding the PNG bytes of the world's image.

============  ===================  ====================================================================
set           split (test_split)   columns
============  ===================  ====================================================================
``pope``      ``test``             id, question_id, question, answer (yes/no), image_source, image,
                                   category (random/popular/adversarial, see
                                   :data:`~mgllava.shapes.world.questions.POPE_STRATEGIES`)
``mmbench``   ``dev``              index, question, hint, A, B, C, D, answer (letter), category,
                                   L2-category, image, source, split, comment  (task mmbench_en_dev)
``textvqa``   ``validation``       question_id, question, image_id, image, image_width, image_height,
                                   answers (10 strings), ocr_tokens, set_name  (task textvqa_val)
``gqa``       ``testdev``          id, imageId, question, answer, fullAnswer, isBalanced, image
============  ===================  ====================================================================

A local task reuses a stock one by including its yaml and pointing it at the
directory, e.g. for POPE::

    include: <lmms_eval>/tasks/pope/pope.yaml
    task: pope_shapes
    dataset_path: OUT/bench/pope
    dataset_kwargs: {load_from_disk: true}

and likewise ``mmbench/mmbench_en_dev.yaml``, ``textvqa/textvqa_val.yaml`` and
``gqa/gqa.yaml`` (checked with lmms-eval 0.7.3's ``TaskManager(include_path=...)``:
all four load offline and their stock ``doc_to_visual``/``doc_to_text`` run on the docs).
GQA needs one more line. The stock task loads the questions
(``testdev_balanced_instructions``), then its ``process_docs`` downloads the
images (``testdev_balanced_images``, columns ``id`` and ``image``) and adds each
question's image, looked up by ``imageId``, as an ``image`` column that
``gqa_doc_to_visual`` reads. Here the questions already carry that ``image``
column, so a local task drops the download with ``process_docs: null``. The
images set is saved as well, under ``OUT/bench/gqa_images`` (split
``testdev``, columns ``id`` and ``image``), for a task that wants to join them
itself.

Every set has two more columns, the question's slice, which the stock tasks ignore and the
evaluation records with each prediction (``predictions.object_size``, ``predictions.small_text``):
``object_size``, the size class (small, medium, large) of the object asked about (the smallest
of them when the answer needs several; null when the question is about no shape in the image),
and ``small_text``, whether it asks about the small rendered number. MG-LLaVA's claim is that
high-resolution and object-level features help most on those fine-grained questions.

The image-id columns (POPE ``image_source``, TextVQA ``image_id``, GQA
``imageId`` and the images set's ``id``) hold the image's key in the world,
e.g. ``bench/000003.png``, to join with ``annotations.jsonl`` or detections.
The MMBench set has no circular copies (index >= 1e6); each correct letter
appears equally often. Every set is deterministic for the world's seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

import datasets

from mgllava.shapes.world import questions as q

BENCHMARKS: tuple[str, ...] = ("pope", "mmbench", "textvqa", "gqa")
"""The benchmark sets, each saved under ``OUT/bench/<name>``."""

SPLITS: dict[str, str] = {"pope": "test", "mmbench": "dev", "textvqa": "validation", "gqa": "testdev"}
"""The split each set is saved under: the ``test_split`` of the stock lmms-eval task."""

_S = datasets.Value("string")
_I = datasets.Value("int64")
SLICE_FEATURES = {"object_size": _S, "small_text": datasets.Value("bool")}
"""The slice columns every set carries (see the module docstring)."""

FEATURES: dict[str, datasets.Features] = {
    "pope": datasets.Features(
        {
            "id": _S,
            "question_id": _S,
            "question": _S,
            "answer": _S,
            "image_source": _S,
            "image": datasets.Image(),
            "category": _S,
            **SLICE_FEATURES,
        }
    ),
    "mmbench": datasets.Features(
        {
            "index": _I,
            "question": _S,
            "hint": _S,
            **{letter: _S for letter in "ABCD"},
            "answer": _S,
            "category": _S,
            "L2-category": _S,
            "image": datasets.Image(),
            "source": _S,
            "split": _S,
            "comment": _S,
            **SLICE_FEATURES,
        }
    ),
    "textvqa": datasets.Features(
        {
            "image_id": _S,
            "question_id": _I,
            "question": _S,
            "image": datasets.Image(),
            "image_width": _I,
            "image_height": _I,
            "answers": datasets.Sequence(_S),
            "ocr_tokens": datasets.Sequence(_S),
            "set_name": _S,
            **SLICE_FEATURES,
        }
    ),
    "gqa": datasets.Features(
        {
            "id": _S,
            "imageId": _S,
            "question": _S,
            "answer": _S,
            "fullAnswer": _S,
            "isBalanced": datasets.Value("bool"),
            "image": datasets.Image(),
            **SLICE_FEATURES,
        }
    ),
}
"""Column types of each set."""

GQA_IMAGES_FEATURES = datasets.Features({"id": _S, "image": datasets.Image()})

_MMBENCH_CATEGORIES: dict[str, tuple[str, str]] = {
    "color": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "shape": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "count": ("counting", "finegrained_perception (cross-instance)"),
    "leftmost": ("spatial_relationship", "finegrained_perception (cross-instance)"),
    "text": ("ocr", "finegrained_perception (instance-level)"),
}
"""MMBench (category, L2-category) of each question kind."""

ImageBytes = Callable[[str], bytes]
"""Returns the PNG bytes of an image given its key ("bench/000003.png")."""


def _image(ann: dict, image_bytes: ImageBytes) -> dict:
    return {"bytes": image_bytes(ann["image"]), "path": None}


def _slice(qa: q.QA) -> dict:
    return {"object_size": qa.size, "small_text": qa.small_text}


def _pope_rows(annotations: list[dict], seed: int, image_bytes: ImageBytes) -> Iterable[dict]:
    """Two questions per image, one yes and one no (so exactly balanced), the negative drawn with the
    POPE strategy that the images take in turn."""
    for i, ann in enumerate(annotations):
        rng = random.Random(f"{seed}/pope/{ann['image']}")
        strategy = q.POPE_STRATEGIES[i % len(q.POPE_STRATEGIES)]
        pair = [q.existence(rng, ann, present=True), q.existence(rng, ann, present=False, strategy=strategy)]
        rng.shuffle(pair)
        for j, qa in enumerate(pair):
            qid = str(2 * i + j)
            yield {
                "id": qid,
                "question_id": qid,
                "question": qa.question,
                "answer": qa.answer,
                "image_source": ann["image"],
                "image": _image(ann, image_bytes),
                "category": strategy,
                **_slice(qa),
            }


def _mmbench_rows(annotations: list[dict], seed: int, image_bytes: ImageBytes) -> Iterable[dict]:
    """One or two four-option questions per image; the correct letters cycle A, B, C, D."""
    generators = (q.color_of, q.shape_of, q.count, q.leftmost, q.read_text)
    index = 0
    for ann in annotations:
        rng = random.Random(f"{seed}/mmbench/{ann['image']}")
        candidates = [qa for gen in generators if (qa := gen(rng, ann)) is not None]
        rng.shuffle(candidates)
        for qa in candidates[: rng.randint(1, 2)]:
            mc = q.multiple_choice(rng, qa, letter="ABCD"[index % 4])
            if mc is None:
                continue
            options, letter = mc
            category, l2_category = _MMBENCH_CATEGORIES[qa.kind]
            yield {
                "index": index,
                "question": qa.question,
                "hint": None,
                **options,
                "answer": letter,
                "category": category,
                "L2-category": l2_category,
                "image": _image(ann, image_bytes),
                "source": "shapes_world",
                "split": "dev",
                "comment": None,
                **_slice(qa),
            }
            index += 1


def _textvqa_rows(annotations: list[dict], seed: int, image_bytes: ImageBytes) -> Iterable[dict]:
    """For each image with a number: read the number, and half of the time its last digit too."""
    question_id = 0
    for ann in annotations:
        rng = random.Random(f"{seed}/textvqa/{ann['image']}")
        qas = [q.read_text(rng, ann)]
        if rng.random() < 0.5:
            qas.append(q.last_digit(rng, ann))
        for qa in qas:
            if qa is None:
                continue
            yield {
                "image_id": ann["image"],
                "question_id": question_id,
                "question": qa.question,
                "image": _image(ann, image_bytes),
                "image_width": ann["width"],
                "image_height": ann["height"],
                "answers": [qa.answer] * 10,
                "ocr_tokens": [ann["text"]],
                "set_name": "val",
                **_slice(qa),
            }
            question_id += 1


def _gqa_rows(annotations: list[dict], seed: int, image_bytes: ImageBytes) -> Iterable[dict]:
    """One to three questions per image: an existence question (yes and no in turn) and colour,
    shape or relation questions."""
    n = 0
    for i, ann in enumerate(annotations):
        rng = random.Random(f"{seed}/gqa/{ann['image']}")
        others = [qa for gen in (q.color_of, q.shape_of, q.relation) if (qa := gen(rng, ann)) is not None]
        rng.shuffle(others)
        qas = [q.existence(rng, ann, present=i % 2 == 0, strategy=rng.choice(q.POPE_STRATEGIES)), *others]
        for qa in qas[: rng.randint(1, 3)]:
            yield {
                "id": f"{n:08d}",
                "imageId": ann["image"],
                "question": qa.question,
                "answer": qa.answer,
                "fullAnswer": qa.full,
                "isBalanced": True,
                "image": _image(ann, image_bytes),
                **_slice(qa),
            }
            n += 1


_BUILDERS: dict[str, Callable[[list[dict], int, ImageBytes], Iterable[dict]]] = {
    "pope": _pope_rows,
    "mmbench": _mmbench_rows,
    "textvqa": _textvqa_rows,
    "gqa": _gqa_rows,
}


def _save(rows: list[dict], features: datasets.Features, split: str, out: Path) -> None:
    columns = {name: [row[name] for row in rows] for name in features}
    dataset = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({split: dataset}).save_to_disk(str(out))


def build_benchmarks(
    annotations: list[dict], seed: int, image_bytes: ImageBytes, out_dir: Path
) -> dict[str, int]:
    """Build and save every set from the bench split's annotations; returns the number of rows of each."""
    sizes = {}
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for name in BENCHMARKS:
            rows = list(_BUILDERS[name](annotations, seed, image_bytes))
            _save(rows, FEATURES[name], SPLITS[name], out_dir / name)
            sizes[name] = len(rows)
        images = [{"id": ann["image"], "image": _image(ann, image_bytes)} for ann in annotations]
        _save(images, GQA_IMAGES_FEATURES, SPLITS["gqa"], out_dir / "gqa_images")
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()
    return sizes
