"""Detection stage, speed-related behaviour: the box table holds exactly Ultralytics' predictions, and
images are decoded in the thread that runs the detector (no decoder thread beside the forward)."""

from __future__ import annotations

import dataclasses
import os
import threading

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_detect import make_images

from detector import pipeline
from detector.model import Detector, DetectorSettings, get_detector


def _settings(model: str) -> DetectorSettings:
    return DetectorSettings(model=model, conf=0.25, imgsz=160, batch=4, max_det=10, device="cpu")


def test_rows_equal_ultralytics_predict(tmp_path, boxy):
    images = tmp_path / "images"
    keys = make_images(images, 5)  # five sizes; batches of 4 then 1 (shard size 4), as below
    res = pipeline.run_detection([images], tmp_path / "out", _settings(boxy), shard_size=4)
    rows = {r["image_key"]: r["boxes"] for r in pq.read_table(res.out / "boxes").to_pylist()}
    model = get_detector(_settings(boxy)).model
    bgr = [np.asarray(Image.open(images / k).convert("RGB"))[:, :, ::-1].copy() for k in keys]
    results = [r for batch in (bgr[:4], bgr[4:]) for r in model.predict(
        batch, imgsz=160, conf=0.25, iou=0.7, max_det=10, batch=len(batch), device="cpu", verbose=False)]
    n_boxes = 0
    for key, result in zip(keys, results, strict=True):
        want = result.boxes.data.float().numpy()  # (n, 6): x1 y1 x2 y2 score class
        got = rows[key]
        assert len(got) == len(want) > 0
        n_boxes += len(got)
        got_arr = np.array([[b["x1"], b["y1"], b["x2"], b["y2"], b["score"]] for b in got], np.float32)
        np.testing.assert_allclose(got_arr, want[:, :5], rtol=0, atol=1e-3)
        assert [b["label"] for b in got] == [result.names[int(c)] for c in want[:, 5]]
    assert res.manifest["totals"]["boxes"] == n_boxes


@pytest.mark.parametrize("loader_threads", [None, 2], ids=["cpu-default", "pool"])
def test_images_are_decoded_in_the_detecting_thread_on_a_cpu_and_by_a_pool_when_asked(tmp_path, monkeypatch,
                                                                                      loader_threads):
    make_images(tmp_path / "images", 10)
    seen: dict[str, set] = {"load": set(), "predict": set()}
    real_load, real_predict = pipeline.load_image, Detector.predict

    def load(*args):
        seen["load"].add(threading.current_thread().name)
        return real_load(*args)

    def predict(self, images):
        seen["predict"].add(threading.current_thread().name)
        return real_predict(self, images)

    monkeypatch.setattr(pipeline, "load_image", load)
    monkeypatch.setattr(Detector, "predict", predict)
    settings = dataclasses.replace(_settings("yolo11n.yaml"), loader_threads=loader_threads)
    assert settings.device == "cpu"
    pipeline.run_detection([tmp_path / "images"], tmp_path / "out", settings, shard_size=8)
    assert seen["load"] and seen["predict"]
    if loader_threads is None:  # a CPU device: decoding between forwards
        assert seen["load"] == seen["predict"]
    else:  # each shard (two here) has its own pool; thread idents can differ between them, names do not
        assert not seen["load"] & seen["predict"]
        assert seen["load"] <= {f"detect-load_{i}" for i in range(loader_threads)}
