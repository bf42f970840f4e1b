"""Detection hardening: third-party weights and dataset YAMLs run no code; box tables never lie."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import pytest
from test_detect import make_images, settings
from test_detect_flow import _same, _table

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


def test_hostile_model_yaml_runs_no_code(tmp_path, unsafe_env, fault_ledger):
    """Ultralytics ``eval``s a model YAML's ``activation`` unless safe loading is on."""
    from ultralytics.utils import ROOT

    marker = tmp_path / "code-ran"
    spec = (ROOT / "cfg" / "models" / "11" / "yolo11.yaml").read_text()
    path = tmp_path / "yolo11n-hostile.yaml"
    path.write_text(f"activation: __import__('os').system('touch {marker}')\n{spec}")
    with pytest.raises(DetectorError) as refused:
        Detector(DetectorSettings(model=str(path), device="cpu"))
    fault_ledger.record("hostile detector model YAML (code in its activation)", not marker.exists())
    assert not marker.exists(), "building the model from its YAML ran code"
    assert f"cannot build a detector from {path}" in str(refused.value) and "activation" in str(refused.value)


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


@pytest.mark.slow  # one short training epoch
def test_dataset_label_caches_run_no_code(tmp_path, fault_ledger):
    """Ultralytics unpickles ``labels/<split>.cache``; a dataset shipping a hostile one runs nothing."""
    import numpy as np
    from test_detect_train import make_yolo_dataset

    from detector.train import train_detector

    data = make_yolo_dataset(tmp_path / "ds", n_train=4, n_val=2, size=64)
    marker = tmp_path / "code-ran"
    for split in ("train", "val"):
        with open(tmp_path / "ds" / "labels" / f"{split}.cache", "wb") as fh:
            np.save(fh, np.array({"version": "1.0.3", "hash": "x", "payload": _RunsCode(marker)}, dtype=object))
    metrics = train_detector(data, tmp_path / "det", epochs=1, imgsz=64, batch=2, device="cpu", workers=0,
                             min_map50=0.0)
    fault_ledger.record("dataset label cache with code in its pickle", not marker.exists())
    assert not marker.exists(), "Ultralytics unpickled the dataset's label cache"
    assert metrics["passed"] and Path(metrics["weights"]).is_file()
    for split in ("train", "val"):  # the labels were scanned and the caches rewritten without the payload
        assert b"code-ran" not in (tmp_path / "ds" / "labels" / f"{split}.cache").read_bytes()


# --------------------------------------------------------------------------- durable box tables


def _rows(out):
    import pyarrow.parquet as pq

    return pq.read_table(out / "boxes").drop_columns(["detected_at"]).sort_by("image_key").to_pylist()


def test_corrupted_shard_is_refused_by_readers_and_redone(tmp_path, caplog, fault_ledger):
    import hashlib
    import json
    import logging

    from detector import pipeline
    from detector.errors import BoxTableError
    from detector.tables import BoxTable

    images = tmp_path / "images"
    make_images(images, 6)
    out = tmp_path / "out"
    first = pipeline.run_detection([images], out, settings(conf=0.99), shard_size=3)
    for shard in first.manifest["shards"]:
        for kind in ("boxes", "rejects"):
            data = (out / shard[f"{kind}_file"]).read_bytes()
            assert shard[f"{kind}_sha256"] == hashlib.sha256(data).hexdigest()
    before, by_key = _rows(out), BoxTable.open(out).keys()
    assert sorted(by_key) == [r["image_key"] for r in before]

    victim = out / "boxes" / "part-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01  # one flipped bit: same size, the footer still parses
    victim.write_bytes(bytes(data))
    with pytest.raises(BoxTableError, match=f"{victim}: content sha256 .* differs"):
        BoxTable.open(out)

    with caplog.at_level(logging.WARNING, logger="detector.pipeline"):
        again = pipeline.run_detection([images], out, settings(conf=0.99), shard_size=3)
    assert not again.skipped and again.computed_shards == [1]
    assert f"shard 1 of {out} is redone: {victim}: content sha256" in caplog.text
    assert _rows(out) == before and BoxTable.open(out).keys() == by_key
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    fault_ledger.record("bit flip in a box shard", survived=_rows(out) == before)


def test_second_run_on_one_directory_is_refused_and_its_temporaries_survive(tmp_path, fault_ledger):
    import subprocess
    import sys

    from detector import pipeline
    from detector.errors import RunConflictError

    images = tmp_path / "images"
    make_images(images, 2)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from detector.pipeline import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "boxes").mkdir()
        theirs = out / "boxes" / f".part-00000.parquet{pipeline.TMP_MARK}{holder.pid}-0a1b2c3d"
        theirs.write_bytes(b"being written by the other run")
        with pytest.raises(RunConflictError, match=f"being written by another detection run .*\"pid\": {holder.pid}"):
            pipeline.run_detection([images], out, settings(conf=0.99))
        assert theirs.exists()
        with pytest.raises(RunConflictError, match="does not hold the directory's lock"):
            pipeline.prepare_run([images], out, settings(conf=0.99), run_id="not-the-holder")
        assert theirs.exists() and not (out / "manifest.json").exists()
    finally:
        holder.communicate("", timeout=30)
    fault_ledger.record("second detect run on a busy output directory", survived=theirs.exists())
    res = pipeline.run_detection([images], out, settings(conf=0.99))  # the lock died with its holder
    assert res.manifest["totals"]["rows"] == 2 and not theirs.exists()


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import stat

    from detector import pipeline

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    pipeline._atomic_write_bytes(tmp_path / "manifest.json", b"{}")
    assert events == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "manifest.json").read_bytes() == b"{}" and os.listdir(tmp_path) == ["manifest.json"]


# --------------------------------------------------------------------------- scale-out


@pytest.mark.slow  # a Prefect server and two Dask worker processes that import torch and Ultralytics
def test_flow_on_dask_worker_processes_writes_the_rows_of_a_local_run(tmp_path, prefect_server, boxy):
    """What ``mgllava detect --dask-address`` runs: the flow in this process holds the lock; planning, the
    shards and finishing run as tasks in two worker processes."""
    from distributed import Client, LocalCluster

    from detector import pipeline
    from flows.detect import detect

    images = tmp_path / "images"
    make_images(images, 9)
    (images / "empty.png").write_bytes(b"")
    s = settings(boxy, batch=2)
    local = pipeline.run_detection([images], tmp_path / "local", s, shard_size=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        manifest = detect([str(images)], str(tmp_path / "dask"), s.to_json(), shard_size=2,
                          dask_address=cluster.scheduler_address)
        loaded = client.run(lambda: __import__("detector.model").model._CACHE.__len__())
    assert len(loaded) == 2 and sum(loaded.values()) >= 1, loaded  # detection ran in the worker processes
    assert manifest["status"] == "complete" and manifest["fingerprint"] == local.manifest["fingerprint"]
    assert manifest["totals"] == local.manifest["totals"] and manifest["totals"]["boxes"] > 0
    _same(_table(tmp_path / "dask"), _table(tmp_path / "local"))
    assert [(sh["index"], sh["rows"], sh["rejects"]) for sh in manifest["shards"]] == [
        (sh["index"], sh["rows"], sh["rejects"]) for sh in local.manifest["shards"]]
