"""Detection hardening: third-party weights and dataset YAMLs run no code; box tables never lie."""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")

import pytest

from detector.errors import DetectorError
from detector.model import Detector, DetectorSettings


class _RunsCode:
    """Unpickling this writes ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def hostile_pt(tmp_path):
    import torch

    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"model": _RunsCode(marker), "train_args": {}}, path)
    return path, marker


@pytest.fixture
def unsafe_env(monkeypatch):
    """A process whose environment turned Ultralytics' safe loading off (its default)."""
    from ultralytics.nn import tasks

    monkeypatch.setenv("ULTRALYTICS_SAFE_LOAD", "0")
    monkeypatch.setattr(tasks, "SAFE_LOAD", False)


def test_hostile_weights_run_no_code(hostile_pt, unsafe_env, fault_ledger):
    path, marker = hostile_pt
    with pytest.raises(DetectorError) as refused:
        Detector(DetectorSettings(model=str(path), device="cpu"))
    fault_ledger.record("hostile detector .pt (code in its pickle)", not marker.exists())
    assert not marker.exists(), "unpickling the detector weights ran code"
    assert f"refused to load detector weights {path}: safe loading" in str(refused.value)


def test_hostile_base_weights_for_detector_training_run_no_code(tmp_path, hostile_pt, unsafe_env, fault_ledger):
    from detector.train import train_detector

    path, marker = hostile_pt
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images\nval: images\nnames: {{0: a}}\n")
    with pytest.raises(Exception) as refused:
        train_detector(data, tmp_path / "det", base=str(path), epochs=1, device="cpu")
    fault_ledger.record("hostile base .pt for detector training", not marker.exists())
    assert not marker.exists(), "unpickling the base weights ran code"
    assert isinstance(refused.value, DetectorError) and "refused to load detector weights" in str(refused.value)


def test_ultralytics_checkpoints_load_under_safe_loading(tmp_path, unsafe_env):
    """Ultralytics' own checkpoints hold its model classes: its allow-list admits them."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn import tasks

    torch.manual_seed(0)
    saved = YOLO("yolo11n.yaml")
    saved.save(str(tmp_path / "own.pt"))
    det = Detector(DetectorSettings(model=str(tmp_path / "own.pt"), device="cpu"))
    assert tasks.SAFE_LOAD is True and os.environ["ULTRALYTICS_SAFE_LOAD"] == "1"
    assert det.arch == "YOLO" and det.names == dict(saved.model.names)
    loaded = det.model.model.state_dict()
    for name, tensor in saved.model.state_dict().items():  # Ultralytics saves in half precision
        assert torch.equal(loaded[name].half(), tensor.half()), name


def test_dataset_yaml_with_download_is_refused(tmp_path, fault_ledger):
    from detector.train import train_detector

    marker = tmp_path / "download-ran"
    data = tmp_path / "data.yaml"
    data.write_text(
        f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n"
        f"download: open({str(marker)!r}, 'w').write('ran')\n"
    )
    with pytest.raises(Exception) as refused:
        train_detector(data, tmp_path / "det", epochs=1, imgsz=64, batch=2, device="cpu", workers=0)
    fault_ledger.record("dataset YAML with a download script", not marker.exists())
    assert not marker.exists(), "Ultralytics ran the dataset's download script"
    assert isinstance(refused.value, DetectorError)
    assert f"dataset YAML {data} has a 'download' key" in str(refused.value) and "refused" in str(refused.value)
