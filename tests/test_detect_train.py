"""``mgllava detector-train``: a short run writes weights + metrics JSON and fails clearly below min_map50.

Training to mAP50 >= 0.6 on the shapes world takes many minutes on 2 CPU cores, so
it is not a test; this one trains 1 epoch on a few images.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow


def make_yolo_dataset(root, n_train=12, n_val=6, size=128):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            im = Image.new("RGB", (size, size), (235, 235, 230))
            d = ImageDraw.Draw(im)
            lines = []
            for _ in range(2):
                cls = int(rng.integers(0, 2))
                s = int(rng.integers(20, 40))
                x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
                (d.ellipse if cls == 0 else d.rectangle)([x, y, x + s, y + s], fill=(200, 40, 40) if cls else (40, 40, 200))
                lines.append(f"{cls} {(x + s / 2) / size:.5f} {(y + s / 2) / size:.5f} {s / size:.5f} {s / size:.5f}")
            im.save(root / "images" / split / f"{i:03d}.png")
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: circle\n  1: square\n"
    )
    return root / "data.yaml"


def test_detector_train_writes_weights_and_fails_below_threshold(tmp_path, capsys, monkeypatch):
    from mgllava.cli import main

    monkeypatch.setenv("MGLLAVA_HOME", str(tmp_path / "home"))
    data = make_yolo_dataset(tmp_path / "ds")
    out = tmp_path / "det"
    rc = main(["detector-train", "--data", str(data), "--epochs", "1", "--imgsz", "128", "--batch", "4",
               "--device", "cpu", "--out", str(out), "--min-map50", "0.99"])
    captured = capsys.readouterr()
    assert rc == 3
    assert "below min_map50 0.99" in captured.err and "FAILED" in captured.err
    best = out / "weights" / "best.pt"
    assert best.is_file()
    metrics = json.loads((out / "weights" / "metrics.json").read_text())
    assert metrics["passed"] is False and metrics["min_map50"] == 0.99 and metrics["split"] == "val"
    assert 0.0 <= metrics["map50"] < 0.99 and metrics["weights"] == str(best)
    printed = [line for line in captured.out.splitlines() if line.startswith('{"map50"')]
    assert json.loads(printed[-1])["map50"] == metrics["map50"]

    # the trained weights load as a detector with the dataset's class names
    from detector.model import DetectorSettings
    from detector.pipeline import run_detection

    res = run_detection([tmp_path / "ds" / "images" / "val"], tmp_path / "boxes",
                        DetectorSettings(model=str(best), conf=0.001, imgsz=128, device="cpu"))
    assert res.manifest["detector"]["names"] == {"0": "circle", "1": "square"}
    assert res.manifest["totals"]["rows"] == 6


def test_detector_train_missing_data_is_an_error(tmp_path, capsys):
    from mgllava.cli import main

    rc = main(["detector-train", "--data", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err
