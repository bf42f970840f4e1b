"""The reader probe: ideal object tokens through the model's splice, POPE questions in the chat template."""

import random

import pytest
import torch

from experiments.reader import ReaderProbe, ideal_features, probe_reader, sample_items
from mgllava.shapes.world.render import COLORS, SHAPES


def test_items_are_balanced_existence_questions_about_their_objects():
    items = sample_items(random.Random(0), 40)
    assert [item.answer for item in items].count("yes") == 20
    for item in items:
        pair = next(
            (c, s)
            for c in range(len(COLORS))
            for s in range(len(SHAPES))
            if f" {COLORS[c]} {SHAPES[s]} " in item.question
        )
        assert (pair in item.objects) == (item.answer == "yes")


def test_ideal_features_are_one_hot_colour_then_shape():
    features = ideal_features([(2, 1), (0, 3)])
    assert features.shape == (2, len(COLORS) + len(SHAPES))
    assert features.sum(dim=1).tolist() == [2.0, 2.0]
    assert features[0, 2] == 1 and features[0, len(COLORS) + 1] == 1


def test_batch_splices_one_token_per_object_and_marks_the_answer(tiny_zoo):
    probe = ReaderProbe.from_pretrained(tiny_zoo / "llm", "vicuna_v1")
    items = sample_items(random.Random(1), 4)
    batch = probe.batch(items)
    inputs = batch["inputs"]
    # each row holds its text plus one token per object
    text_lengths = [
        len(
            probe.processor.tokenize_conversation([("human", "<image>\n" + i.question), ("gpt", i.answer)])[0]
        )
        - 1
        for i in items
    ]
    assert inputs.attention_mask.sum(dim=1).tolist() == [
        t + len(i.objects) for t, i in zip(text_lengths, items)
    ]
    # the token after each answer position is that item's answer token
    for row, item in enumerate(items):
        assert inputs.labels[row, batch["answer_at"][row] + 1] == probe.answer_ids[item.answer]
    assert probe.answer_ids["yes"] != probe.answer_ids["no"]


def test_probe_trains_and_reports_held_out_accuracy(tiny_zoo):
    history = probe_reader(
        tiny_zoo / "llm", steps=4, batch_size=4, n_held_out=16, evaluations=2, progress=False
    )
    assert [point["step"] for point in history] == [0, 2, 4]
    assert all(0.0 <= point["accuracy"] <= 1.0 for point in history)
    assert all(torch.isfinite(torch.tensor(point["loss"])) for point in history[1:])


def test_choice_share_mixes_in_choose_questions_answered_from_the_objects():
    items = sample_items(random.Random(3), 60, choice_share=0.5)
    choose = [item for item in items if " or " in item.question.split("\n")[0]]
    assert 15 <= len(choose) <= 45 and len(items) == 60
    for item in choose:
        shape = item.question.split()[2]  # "Is the circle red or blue?"
        colours = [c for c, s in item.objects if SHAPES[s] == shape]
        assert [COLORS[c] for c in colours] == [item.answer] and item.answer in item.question


def test_cli_names_a_missing_llm_directory(tmp_path):
    from experiments.reader import main

    with pytest.raises(SystemExit, match="no LLM directory at .*nowhere"):
        main(["--llm", str(tmp_path / "nowhere"), "--steps", "1"])


def test_the_same_seed_gives_the_same_run(tiny_zoo):
    def run():
        return probe_reader(tiny_zoo / "llm", steps=2, batch_size=4, n_held_out=8, evaluations=1, progress=False)

    assert run() == run()
