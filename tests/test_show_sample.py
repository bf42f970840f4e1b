"""``mgllava show-sample``: one training record as the model sees it, on the tiny world."""

from __future__ import annotations

import json

import torch
from conftest import tiny_overrides

from detector.box_import import import_boxes
from mgllava.cli import main
from mgllava.model.boxes import map_boxes_to_frame

N_IMAGE_TOKENS = 64  # the tiny CLIP: (112 / 14) ** 2


def test_show_sample_prints_text_loss_tokens_and_boxes(tiny_world, tiny_zoo, tmp_path, capsys):
    from PIL import Image

    record = json.loads((tiny_world / "instruct.json").read_text())[0]
    width, height = Image.open(tiny_world / "images" / record["image"]).size
    # two boxes of one category overlapping (the class-aware NMS keeps the better) and one other
    box_file = [{"id": record["id"], "boxes": [[2, 2, 40, 40], [3, 3, 40, 41], [50, 10, 90, 60]],
                 "scores": [0.9, 0.5, 0.8], "labels": ["circle", "circle", "square"]}]
    (tmp_path / "boxes.json").write_text(json.dumps(box_file))
    import_boxes(tmp_path / "boxes.json", tiny_world / "instruct.json", tiny_world / "images", tmp_path / "table")
    overrides = [f"--set={o}" for o in tiny_overrides(tiny_world, tiny_zoo, tmp_path / "work")]

    code = main(["show-sample", *overrides, f"--set=data.boxes_dir={tmp_path / 'table'}",
                 "--stage", "finetune", "--index", "0", "--tokens"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"(id {record['id']!r}), chat template vicuna_v1" in out
    assert f"image: {record['image']} ({width} x {height}), detections in the box table" in out
    assert "boxes: 2 after filtering and mapping, [x1, y1, x2, y2] in the 256 x 256 frame:" in out
    expected = map_boxes_to_frame(torch.tensor([[2.0, 2, 40, 40], [50, 10, 90, 60]]), width, height, 256)
    shown = [[float(v) for v in line.strip(" []").split(",")] for line in out.splitlines() if line.startswith("  [")]
    assert torch.allclose(torch.tensor(shown), expected, atol=0.06)

    # the image placeholder opens the first question, its tokens spliced there; each answer carries the loss
    assert f"USER: <image: {N_IMAGE_TOKENS} image + 2 object tokens>\n" in out
    rendered = out.split("loss-bearing tokens between ⟦ ⟧:\n")[1].split("position  id  label  piece")[0]
    answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    for answer in answers:
        assert f"⟦{answer}</s>⟧" in rendered
    assert rendered.count("⟦") == rendered.count("⟧") == len(answers)
    token_lines = out.split("position  id  label  piece\n")[1].splitlines()
    n_text = len(token_lines)
    n_loss = sum(line.split()[2] != "-100" for line in token_lines)
    assert (f"tokens: {n_text} text (budget 448) + 1 x {N_IMAGE_TOKENS} image + 2 object = "
            f"{n_text - 1 + N_IMAGE_TOKENS + 2} positions (max_length 512); loss on {n_loss} text tokens") in out
    assert token_lines[0].split()[1] == "1" and sum("'<image>'" in line for line in token_lines) == 1


def test_show_sample_names_a_record_outside_the_corpus(tiny_world, tiny_zoo, tmp_path, capsys):
    overrides = [f"--set={o}" for o in tiny_overrides(tiny_world, tiny_zoo, tmp_path / "work")]
    n = len(json.loads((tiny_world / "pretrain.json").read_text()))
    assert main(["show-sample", *overrides, "--stage", "pretrain", "--index", str(n)]) == 2
    assert f"argument --index: {n} is outside {tiny_world / 'pretrain.json'} ({n} records)" in capsys.readouterr().err
