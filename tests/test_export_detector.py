"""An export knows its detector (issue 17, item 8; SPEC section 5).

A box table made by a (random, boxes-everywhere) yolo11n saved as ``.pt`` by Ultralytics; an export
that records it; evaluation of images no box table covers then detects with the recorded copy (the
original weights file moved away), through the Python API and the stock ``lmms-eval`` command; a
tampered copy is refused by its sha256 before it is loaded, and the command exits non-zero.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from detector.model import DetectorSettings, get_detector
from detector.pipeline import run_detection
from mgllava import child_environment
from mgllava.config import load_config
from mgllava.eval.boxes import (
    DETECTOR_RECORD,
    EXPORT_DETECTOR_DIR,
    BoxesUnavailable,
    ImageRef,
    detector_fingerprint,
    recorded_detector,
)
from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor

NEW_IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 140, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def trained_with_detector(tiny_world, tiny_zoo, tmp_path_factory):
    """``(export dir, original detector settings, the box table)``; the original weights are moved away."""
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("export_detector")
    torch.manual_seed(0)
    yolo = YOLO("yolo11n.yaml")
    with torch.no_grad():
        for seq in yolo.model.model[-1].cv3:
            seq[-1].bias[:5] = 3.0  # 'detects' boxes everywhere
    weights = root / "weights" / "boxy.pt"
    weights.parent.mkdir()
    yolo.save(str(weights))
    settings = DetectorSettings(model=str(weights), conf=0.25, imgsz=96, max_det=7, batch=4, device="cpu")
    images = root / "images"
    images.mkdir()
    for path in sorted((tiny_world / "images").glob("*.png"))[:2]:
        shutil.copy(path, images / path.name)
    table = root / "boxes"
    run_detection([images], table, settings)
    config = load_config(overrides=tiny_overrides(tiny_world, tiny_zoo, root / "work"))
    model = MGLLaVAForConditionalGeneration.from_config(config.model)
    export = model.export(root / "export", MGLLaVAProcessor.from_config(config.model), box_table=table)
    expected = get_detector(settings).predict([np.asarray(NEW_IMAGE)[:, :, ::-1].copy()])[0]
    weights.rename(root / "elsewhere.pt")  # the export must not need the original file
    return export, expected, table


def test_export_copies_the_box_tables_detector(trained_with_detector):
    export, _, table = trained_with_detector
    record = json.loads((export / EXPORT_DETECTOR_DIR / DETECTOR_RECORD).read_text())
    manifest = json.loads((table / "manifest.json").read_text())
    assert record["model"] == "boxy.pt" and record["copied"]
    assert record["weights_sha256"] == manifest["detector"]["weights_sha256"]
    assert record["settings"]["imgsz"] == 96 and record["settings"]["max_det"] == 7
    assert record["box_table_fingerprint"] == manifest["fingerprint"]


def test_evaluation_detects_unseen_images_with_the_recorded_detector(trained_with_detector, tmp_path):
    from mgllava.eval.lmms_model import MGLLaVALmms

    export, expected, _ = trained_with_detector
    lm = MGLLaVALmms(pretrained=str(export), device="cpu", detection_cache=str(tmp_path / "cache"))
    assert lm.box_source.settings.model == str(export / EXPORT_DETECTOR_DIR / "boxy.pt")
    [(boxes, origin)] = lm.box_source.boxes([ImageRef(NEW_IMAGE)])
    assert origin == "detector" and len(expected) > 0
    assert boxes.xyxy.tolist() == [list(d[:4]) for d in expected] and boxes.labels == [d[5] for d in expected]
    # detector=none overrides the record: with no table row that is an error again
    plain = MGLLaVALmms(pretrained=str(export), device="cpu", detector="none")
    with pytest.raises(LookupError, match="no detector is configured"):
        plain.box_source.boxes([ImageRef(NEW_IMAGE)])


def _tampered(export: Path, root: Path) -> Path:
    copy = root / "tampered"
    shutil.copytree(export, copy)
    with open(copy / EXPORT_DETECTOR_DIR / "boxy.pt", "ab") as fh:
        fh.write(b"\0")
    return copy


def test_a_tampered_recorded_detector_is_refused(trained_with_detector, tmp_path, fault_ledger):
    from mgllava.eval.lmms_model import MGLLaVALmms

    tampered = _tampered(trained_with_detector[0], tmp_path)
    with pytest.raises(BoxesUnavailable, match="does not match its record") as caught:
        MGLLaVALmms(pretrained=str(tampered), device="cpu")
    assert isinstance(caught.value, SystemExit) and "boxy.pt" in str(caught.value)
    fault_ledger.record("tampered recorded detector weights", survived=True)


@pytest.mark.slow
def test_stock_lmms_eval_command_uses_the_recorded_detector(trained_with_detector, tiny_world, tiny_zoo,
                                                            tmp_path, fault_ledger):
    """``lmms-eval --model mgllava --model_args pretrained=DIR`` with no box table: exit 0, boxes from the
    recorded detector (its cache fills); on the tampered export the command exits 1 with the reason."""
    from mgllava.eval.tasks import plan_tasks, write_task_files

    export = trained_with_detector[0]
    config = load_config(overrides=tiny_overrides(tiny_world, tiny_zoo, tmp_path / "work"))
    tasks = write_task_files(plan_tasks(config, ["pope"]), tmp_path / "tasks")
    env = dict(child_environment(), HOME=str(tmp_path / "home"))  # a user's shell: no distributed world

    def lmms_eval(model_dir: Path) -> subprocess.CompletedProcess:
        command = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "mgllava", "--model_args",
                   f"pretrained={model_dir},device=cpu", "--batch_size", "2", "--tasks", "pope_mgllava",
                   "--include_path", str(tasks), "--limit", "2", "--output_path", str(tmp_path / "out")]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    done = lmms_eval(export)
    assert done.returncode == 0, done.stderr[-3000:]
    # the evaluated image (both POPE questions ask about one) was detected by the recorded detector
    recorded = detector_fingerprint(recorded_detector(export, device="cpu")[0])
    cached = list((tmp_path / "home" / ".cache" / "mgllava" / "detections").rglob("*.json"))
    assert cached and all(path.parent.parent.name == recorded for path in cached), done.stderr[-3000:]

    refused = lmms_eval(_tampered(export, tmp_path))
    assert refused.returncode == 1
    assert "does not match its record" in refused.stderr
    fault_ledger.record("lmms-eval on an export with a tampered detector", survived=True)


def test_what_cannot_be_recorded_is_not(trained_with_detector, tmp_path):
    """An imported table (no detector settings) or weights changed since detection record nothing; a model
    YAML name is recorded by name, and its built weights are checked against the recorded hash."""
    from detector.errors import DetectorError
    from mgllava.eval.boxes import BoxSource, record_detector

    manifest = json.loads((trained_with_detector[2] / "manifest.json").read_text())
    table = tmp_path / "table"
    table.mkdir()

    def record(settings: dict | None, sha: str = "0" * 64) -> dict | None:
        (table / "manifest.json").write_text(json.dumps(dict(manifest, settings=settings, detector=dict(
            manifest["detector"], weights_sha256=sha))))
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        return record_detector(table, tmp_path / "out")

    assert record(None) is None  # mgllava detect import: the boxes came from a file
    changed = tmp_path / "changed.pt"
    changed.write_bytes(b"not the weights that made the table")
    assert record(dict(manifest["settings"], model=str(changed))) is None
    assert not (tmp_path / "out").exists()
    assert record(dict(manifest["settings"], model="yolo11n.yaml"), sha="f" * 64)["copied"] is False
    export = tmp_path / "export"
    export.mkdir()
    (tmp_path / "out").rename(export / EXPORT_DETECTOR_DIR)
    settings, sha = recorded_detector(export, device="cpu")
    assert settings.model == "yolo11n.yaml" and sha == "f" * 64
    with pytest.raises(DetectorError, match="do not match the recorded sha256"):
        BoxSource(None, settings, tmp_path / "cache", weights_sha256=sha).boxes([ImageRef(NEW_IMAGE)])
