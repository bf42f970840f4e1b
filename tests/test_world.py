"""Tests of the synthetic shapes world (mgllava.shapes.world): determinism, layout, corpora and benchmark schemas."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
import yaml

from mgllava.shapes.world import (
    COLORS,
    SHAPES,
    WorldSpec,
    generate_world,
    load_annotations,
    read_manifest,
    register_cli,
)
from mgllava.shapes.world.benchmarks import BENCHMARKS, SPLITS
from mgllava.shapes.world.corpora import build_instruct
from mgllava.shapes.world.generate import VERSION
from mgllava.shapes.world.render import sample_scene

N_IMAGES = 30
STOCK_TASKS = Path(datasets.__file__).parent.parent / "lmms_eval" / "tasks"

# Columns the stock lmms-eval 0.7.3 tasks read from a doc (their utils.py and yaml doc_to_* fields),
# plus the stock yaml that names the split they evaluate (test_split).
STOCK_COLUMNS = {
    # pope/utils.py: image, question, answer, question_id; the pope_{adv,pop,random} variants split by category
    "pope": ("pope/pope.yaml", {"image", "question", "answer", "question_id", "category"}),
    # mmbench/en_utils.py + mmbench_evals.py: image, question, answer, A-D, category, L2-category, index, hint, source, split
    "mmbench": (
        "mmbench/mmbench_en_dev.yaml",
        {
            "image",
            "question",
            "answer",
            "A",
            "B",
            "C",
            "D",
            "category",
            "L2-category",
            "index",
            "hint",
            "source",
            "split",
        },
    ),
    # textvqa/utils.py: image, question, answers, question_id, ocr_tokens
    "textvqa": ("textvqa/textvqa_val.yaml", {"image", "question", "answers", "question_id", "ocr_tokens"}),
    # gqa/utils.py: imageId (joined with the images set's id), image, question; gqa.yaml doc_to_target: answer
    "gqa": ("gqa/gqa.yaml", {"imageId", "image", "question", "answer"}),
}


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root but data.yaml, whose `path` is the world's own directory."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "data.yaml"
    }


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worlds")
    return {
        "a": generate_world(root / "a", N_IMAGES, seed=0, progress=False),
        "b": generate_world(root / "b", N_IMAGES, seed=0, progress=False),
        "c": generate_world(root / "c", N_IMAGES, seed=1, progress=False),
    }


@pytest.fixture(scope="module")
def world(worlds: dict[str, Path]) -> Path:
    return worlds["a"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _stock_yaml(relpath: str) -> dict:
    """A stock task yaml with its `include:` resolved and `!function` tags read as plain strings."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    path = STOCK_TASKS / relpath
    config = yaml.load(path.read_text(), Loader=Loader)
    if "include" in config:
        config = {**_stock_yaml(str(Path(relpath).parent / config.pop("include"))), **config}
    return config


def test_same_seed_same_bytes(worlds: dict[str, Path]) -> None:
    a, b = _hashes(worlds["a"]), _hashes(worlds["b"])
    assert any(k.startswith("bench/pope/") and k.endswith(".arrow") for k in a)
    assert a == b


def test_different_seed_differs(worlds: dict[str, Path]) -> None:
    a, c = _hashes(worlds["a"]), _hashes(worlds["c"])
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != c.get(k) for k in images) == len(images)
    assert a["pretrain.json"] != c["pretrain.json"]


def test_manifest_and_splits(world: Path) -> None:
    manifest = json.loads((world / "world.json").read_text())
    assert manifest["complete"] is True and manifest["version"] == VERSION
    assert (manifest["seed"], manifest["n_images"]) == (0, N_IMAGES)
    assert manifest["classes"] == list(SHAPES) and manifest["colors"] == list(COLORS)
    assert manifest["splits"] == WorldSpec(N_IMAGES, 0).splits
    assert sum(manifest["splits"].values()) == N_IMAGES and min(manifest["splits"].values()) >= 2
    for split, n in manifest["splits"].items():
        assert len(list((world / "images" / split).glob("*.png"))) == n
        assert len(list((world / "labels" / split).glob("*.txt"))) == n
        assert len(load_annotations(world, split)) == n
    assert len(load_annotations(world)) == N_IMAGES


def test_annotations(world: Path) -> None:
    records = load_annotations(world)
    sizes = {(r["width"], r["height"]) for r in records}
    assert any(w == h for w, h in sizes) and any(w != h for w, h in sizes)
    assert 0.3 < sum(r["text"] is not None for r in records) / len(records) < 0.7
    for r in records:
        assert 192 <= r["width"] <= 384 and 192 <= r["height"] <= 384
        assert 1 <= len(r["objects"]) <= 6
        assert (world / "images" / r["image"]).is_file()
        boxes = [o["box"] for o in r["objects"]] + ([r["text_box"]] if r["text"] is not None else [])
        for o in r["objects"]:
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in ("small", "medium", "large")
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
        for i, a in enumerate(boxes):  # no two boxes overlap
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        if r["text"] is not None:
            assert r["text"].isdigit() and 2 <= len(r["text"]) <= 4


def test_yolo_labels_and_data_yaml(world: Path) -> None:
    data = yaml.safe_load((world / "data.yaml").read_text())
    assert Path(data["path"]) == world
    assert (world / data["train"]).is_dir() and (world / data["val"]).is_dir()
    assert list(data["names"].values()) == json.loads((world / "world.json").read_text())["classes"]
    assert list(data["names"]) == list(range(len(SHAPES)))
    for r in load_annotations(world):
        label = world / "labels" / Path(r["image"]).with_suffix(".txt")
        rows = [line.split() for line in label.read_text().splitlines()]
        assert len(rows) == len(r["objects"])
        for row, obj in zip(rows, r["objects"], strict=True):
            assert int(row[0]) == SHAPES.index(obj["shape"])
            cx, cy, w, h = map(float, row[1:])
            assert all(0 < v <= 1 for v in (cx, cy, w, h))
            assert 0 <= cx - w / 2 and cx + w / 2 <= 1 + 1e-6 and 0 <= cy - h / 2 and cy + h / 2 <= 1 + 1e-6


def _check_llava(records: list[dict], root: Path, allowed_images: set[str]) -> None:
    """The LLaVA conversation schema: keys, alternating roles starting with human, <image> once."""
    assert records
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert set(r) == {"id", "image", "conversations"}
        assert r["image"] in allowed_images and (root / "images" / r["image"]).is_file()
        turns = r["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        for i, turn in enumerate(turns):
            assert set(turn) == {"from", "value"}
            assert turn["from"] == ("human" if i % 2 == 0 else "gpt")
            assert isinstance(turn["value"], str) and turn["value"].strip()
            assert ("<image>" in turn["value"]) == (i == 0)
        assert turns[0]["value"].startswith("<image>\n") and turns[0]["value"].count("<image>") == 1


def test_llava_corpora(world: Path) -> None:
    train = {r["image"] for r in load_annotations(world, "train")}
    pretrain = json.loads((world / "pretrain.json").read_text())
    instruct = json.loads((world / "instruct.json").read_text())
    _check_llava(pretrain, world, train)
    _check_llava(instruct, world, train)
    assert all(len(r["conversations"]) == 2 for r in pretrain)
    assert len({r["conversations"][0]["value"] for r in pretrain}) > 3  # varied requests
    assert all(6 <= len(r["conversations"]) // 2 <= 9 for r in instruct)
    answers = Counter(t["value"] for r in instruct for t in r["conversations"][1::2])
    assert answers["yes"] > 0 and answers["yes"] == answers["no"]  # two of each per image (POPE-style)
    prompts = " ".join(t["value"] for r in instruct for t in r["conversations"][::2])
    assert "What color is" in prompts and "How many" in prompts and "There are several options" in prompts
    assert "Is the circle red or" in prompts or "Is the square red or" in prompts  # choose questions


def test_choice_question_names_the_answer_and_one_wrong_option() -> None:
    from mgllava.shapes.world.questions import choice

    ann = {"objects": [{"color": "red", "shape": "circle"}, {"color": "green", "shape": "square"},
                       {"color": "blue", "shape": "square"}]}
    wrong = set()
    for seed in range(40):
        qa = choice(random.Random(seed), ann)
        # only the circle has a unique shape: "Is the circle red or X?" / "Is the circle X or red?"
        first, second = qa.question.removeprefix("Is the circle ").rstrip("?").split(" or ")
        assert qa.answer == "red" and "red" in (first, second) and first != second
        wrong.add(second if first == "red" else first)
    assert len(wrong) > 2  # the wrong option varies
    assert choice(random.Random(0), {"objects": [{"color": "red", "shape": "circle"}] * 2}) is None


def test_four_option_drills_put_the_answer_at_its_letter() -> None:
    from mgllava.shapes.world.questions import MC_OPTIONS_HEADER, four_option_question, letter_lookup

    def options(prompt: str) -> dict[str, str]:
        return dict(re.findall(r"^([ABCD])\. (.+)$", prompt, re.MULTILINE))

    letters = Counter()
    for seed in range(40):
        prompt, letter = letter_lookup(random.Random(seed))
        asked = re.match(r"Which option is (\w+)\?", prompt)[1]
        assert options(prompt)[letter] == asked and len(set(options(prompt).values())) == 4
        letters[letter] += 1
    assert set(letters) == set("ABCD")  # the answer's place varies

    ann = {"objects": [{"color": "red", "shape": "circle", "size": "large", "box": [10, 10, 40, 40]},
                       {"color": "green", "shape": "square", "size": "small", "box": [100, 10, 130, 40]}]}
    for seed in range(40):
        prompt, letter = four_option_question(random.Random(seed), ann, letter="C")
        question = prompt.split(f" {MC_OPTIONS_HEADER}")[0]
        right = {"What color is the circle?": "red", "What color is the square?": "green",
                 "What shape is the red object?": "circle", "What shape is the green object?": "square",
                 "Which object is furthest to the left?": "red circle"}.get(question)
        if counted := re.fullmatch(r"How many (\w+)s are there in the image\?", question):
            right = str(sum(o["shape"] == counted[1] for o in ann["objects"]))
        assert letter == "C" and options(prompt)["C"] == right, prompt


def test_several_conversations_per_image_ask_different_questions(world: Path) -> None:
    anns = load_annotations(world, "train")
    one, three = build_instruct(anns, seed=0), build_instruct(anns, seed=0, per_image=3)
    assert three[: len(one)] == one and len(three) == 3 * len(one)
    assert len({r["id"] for r in three}) == len(three)
    by_image = {}
    for r in three:
        by_image.setdefault(r["image"], []).append(tuple(t["value"] for t in r["conversations"]))
    assert all(len(set(conversations)) == 3 for conversations in by_image.values())
    assert WorldSpec(N_IMAGES, 0, 3).matches(read_manifest(world) or {}) is False


def test_instruct_existence_balanced() -> None:
    """Over a larger corpus, existence questions are about half yes and half no."""
    anns = []
    for i in range(400):
        scene = sample_scene(random.Random(i), with_text=i % 2 == 0)
        anns.append(
            {
                "image": f"train/{i:06d}.png",
                "width": scene.width,
                "height": scene.height,
                "objects": [o.to_json() for o in scene.objects],
                "text": scene.text,
                "text_box": scene.text_box,
            }
        )
    existence = Counter(
        a["value"]
        for r in build_instruct(anns, seed=0)
        for q, a in zip(r["conversations"][::2], r["conversations"][1::2], strict=True)
        if "Is there" in q["value"] and "options" not in q["value"]
    )
    assert existence["yes"] + existence["no"] >= 300
    assert abs(existence["yes"] - existence["no"]) / (existence["yes"] + existence["no"]) < 0.15


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_schema(world: Path, name: str) -> None:
    stock_yaml, columns = STOCK_COLUMNS[name]
    split = _stock_yaml(stock_yaml)["test_split"]
    assert SPLITS[name] == split
    ds = datasets.load_from_disk(str(world / "bench" / name))
    assert list(ds) == [split]
    table = ds[split]
    assert len(table) > 0
    assert columns <= set(table.column_names)
    assert isinstance(table.features["image"], datasets.Image)
    assert table[0]["image"].mode == "RGB"


def test_gqa_images_join(world: Path) -> None:
    questions = datasets.load_from_disk(str(world / "bench" / "gqa"))["testdev"]
    images = datasets.load_from_disk(str(world / "bench" / "gqa_images"))["testdev"]
    ids = set(images["id"])
    assert set(questions["imageId"]) <= ids
    assert set(questions["answer"]) <= {"yes", "no", "left", "right", "above", "below", *COLORS, *SHAPES}


def test_bench_disjoint_from_train_val(world: Path) -> None:
    def digests(split: str) -> set[str]:
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (world / "images" / split).glob("*.png")}

    assert digests("bench").isdisjoint(digests("train") | digests("val"))
    bench_keys = {r["image"] for r in load_annotations(world, "bench")}
    pope = datasets.load_from_disk(str(world / "bench" / "pope"))["test"]
    textvqa = datasets.load_from_disk(str(world / "bench" / "textvqa"))["validation"]
    assert set(pope["image_source"]) <= bench_keys and set(textvqa["image_id"]) <= bench_keys
    used = {
        r["image"] for f in ("pretrain.json", "instruct.json") for r in json.loads((world / f).read_text())
    }
    assert used.isdisjoint(bench_keys)


def test_pope_balanced_and_mmbench_letters(world: Path) -> None:
    pope = datasets.load_from_disk(str(world / "bench" / "pope"))["test"]
    answers = Counter(pope["answer"])
    assert answers["yes"] == answers["no"] and set(answers) == {"yes", "no"}
    assert set(pope["category"]) == {"random", "popular", "adversarial"}
    mmbench = datasets.load_from_disk(str(world / "bench" / "mmbench"))["dev"]
    letters = Counter(mmbench["answer"])
    assert set(letters) <= set("ABCD") and max(letters.values()) - min(letters.get(c, 0) for c in "ABCD") <= 1
    for row in mmbench.remove_columns("image"):
        assert len({row[c] for c in "ABCD"}) == 4
    textvqa = datasets.load_from_disk(str(world / "bench" / "textvqa"))["validation"]
    assert all(len(a) == 10 for a in textvqa["answers"])


@pytest.mark.slow
def test_stock_lmms_eval_utils_accept_docs(world: Path) -> None:
    """The stock tasks' own doc_to_visual/doc_to_text/process_results work on the sets (imports lmms_eval: ~10 s)."""
    from lmms_eval.tasks.gqa import utils as gqa
    from lmms_eval.tasks.mmbench import en_utils as mmbench
    from lmms_eval.tasks.pope import utils as pope
    from lmms_eval.tasks.textvqa import utils as textvqa

    kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}

    def first(name: str) -> dict:
        return datasets.load_from_disk(str(world / "bench" / name))[SPLITS[name]][0]

    doc = first("pope")
    assert pope.pope_doc_to_visual(doc)[0].mode == "RGB"
    assert pope.pope_doc_to_text(doc, kwargs).startswith(doc["question"])
    assert pope.pope_process_results(doc, [doc["answer"]])["pope_accuracy"]["score"] == 1.0

    doc = first("mmbench")
    assert mmbench.mmbench_doc_to_visual(doc)[0].mode == "RGB"
    assert "D. " in mmbench.mmbench_doc_to_text(doc, {"post_prompt": "\nAnswer with the option's letter."})
    assert mmbench.mmbench_process_results(doc, [doc["answer"]])["submission"]["answer"] == doc["answer"]

    doc = first("textvqa")
    assert textvqa.textvqa_doc_to_visual(doc)[0].mode == "RGB"
    assert "Reference OCR token" in textvqa.textvqa_doc_to_text(doc, {**kwargs, "ocr": True})
    assert textvqa.textvqa_process_results(doc, [doc["answers"][0]])["exact_match"] == 1.0

    doc = first("gqa")
    assert gqa.gqa_doc_to_visual(doc)[0].mode == "RGB"
    assert gqa.gqa_doc_to_text(doc, kwargs).startswith(doc["question"])


def test_idempotent_and_cli(
    world: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _hashes(world)
    stamp = (world / "world.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="mgllava.shapes.world"):
        assert generate_world(world, N_IMAGES, seed=0, progress=False) == world
    assert "skipping" in caplog.text
    assert (world / "world.json").stat().st_mtime_ns == stamp and _hashes(world) == before

    parser = argparse.ArgumentParser(prog="mgllava")
    register_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    for images in (8, 10):  # a different spec regenerates the directory
        args = parser.parse_args(
            ["world", "--out", str(out), "--images", str(images), "--seed", "3", "--quiet"]
        )
        args.func(args)
        line = capsys.readouterr().out.strip()
        assert line.count("\n") == 0 and f"{images} images" in line and str(out) in line
        assert len(load_annotations(out)) == images
        assert len(list((out / "images").rglob("*.png"))) == images
