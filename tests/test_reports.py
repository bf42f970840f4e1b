"""What users see: the pictures (real PNGs of the expected content), the progress hooks, and the
flows' artifacts and log lines in Prefect (a temporary server; the UI itself in ``test_ui_check.py``)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from PIL import Image

from mgllava import plots


def _png(path, size=None) -> np.ndarray:
    """The decoded PNG as RGB pixels; it must be a PNG, of ``size`` when given, and not blank."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        if size:
            assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    return pixels


def test_loss_curves_score_chart_and_history_are_pngs(tmp_path):
    steps = [(stage, s, 2.0 / s, 1e-3 * min(1, s / 3)) for stage in ("finetune", "pretrain") for s in range(1, 11)]
    _png(plots.loss_curves(steps, tmp_path / "loss.png"), size=(1000, 360))  # one 5 x 3.6 in panel per stage
    with pytest.raises(ValueError, match="no training steps"):
        plots.loss_curves([], tmp_path / "none.png")

    scores = [{"task": "pope", "metric": "pope_accuracy", "value": 0.73},
              {"task": "pope", "metric": "pope_f1_score", "value": 0.76},
              {"task": "mmbench", "metric": "gpt_eval_score", "value": 29.8},  # percent: charted as 0.298
              {"task": "textvqa", "metric": "exact_match", "value": None}]
    assert plots._headlines(scores) == {"pope": ("pope_accuracy", 0.73), "mmbench": ("gpt_eval_score", 0.298)}
    pixels = _png(plots.score_chart(scores, tmp_path / "scores.png"))
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 50  # the chance marks

    now = dt.datetime(2026, 11, 30, 8, 0)
    history = [(now + dt.timedelta(hours=h), "pope", "pope_accuracy", 0.5 + 0.1 * h) for h in range(3)]
    _png(plots.score_history(history + [(now, "mmbench", "gpt_eval_score", 25.0)], tmp_path / "history.png"))


def test_boxes_are_drawn_where_the_detections_are(tmp_path):
    image = Image.new("RGB", (200, 160), (255, 255, 255))
    detections = [(20.0, 30.0, 120.0, 110.0, 0.9, "circle"), (130.0, 40.0, 190.0, 150.0, 0.5, "square")]
    pixels = _png(plots.boxed_image(image, detections, tmp_path / "boxed.png"), size=(200, 160))
    assert (pixels[70, 20] != 255).any() and (pixels[70, 119] != 255).any()  # left and right edges of box 1
    assert (pixels[70, 70] == 255).all()  # inside a box: untouched
    assert (pixels[5, 5] == 255).all()  # outside: untouched
    assert not (pixels[70, 20] == pixels[100, 130]).all()  # each label its own colour

    gallery = plots.detection_gallery([(image, detections, "a.png"), (image, detections[:1], "b.png"),
                                       (image, [], "c.png")], tmp_path / "gallery.png", tile=128, columns=2)
    _png(gallery, size=(256, 2 * (128 + 18)))


def test_training_step_lines_are_read_back_as_progress():
    from mgllava.train.engine import STEP_LINE
    from mgllava.train.launch import STEP_PATTERN

    line = "2026-11-30 08:00:00 INFO mgllava.train.engine: " + STEP_LINE % ("finetune", 3, 12, 0.4321, 2e-5, 7.5)
    found = STEP_PATTERN.search(line)
    assert found.groupdict() == {"stage": "finetune", "step": "3", "total": "12", "loss": "0.4321",
                                 "lr": "2.000e-05", "samples_per_s": "7.50"}
