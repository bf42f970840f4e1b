"""The Prefect flow ``detect``: local task runner and a local Dask cluster give the same box table."""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from detector import pipeline
from detector.model import DetectorSettings

pytestmark = pytest.mark.slow  # a temporary Prefect server (~10-20 s to start)




def make_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (128 + 8 * i, 120), (240, 240, 235))
        ImageDraw.Draw(im).ellipse([10 + 3 * i, 20, 60 + 3 * i, 70], fill=(30, 70, 220))
        im.save(folder / f"{i:04d}.png")


def _table(out):
    t = pq.read_table(out / "boxes").sort_by("image_key").drop_columns(["detected_at"])
    r = pq.read_table(out / "rejects").sort_by("image_key").drop_columns(["detected_at"])
    return t.to_pylist(), r.to_pylist()


def _same(a, b):
    (rows_a, rej_a), (rows_b, rej_b) = a, b
    assert rej_a == rej_b
    assert len(rows_a) == len(rows_b)
    for x, y in zip(rows_a, rows_b, strict=True):
        bx, by = x.pop("boxes"), y.pop("boxes")
        assert x == y
        assert [b["label"] for b in bx] == [b["label"] for b in by]
        for p, q in zip(bx, by, strict=True):
            for k in ("x1", "y1", "x2", "y2", "score"):
                assert p[k] == pytest.approx(q[k], abs=1e-3)


def test_flow_local_and_dask_match_library(tmp_path, prefect_server, boxy, monkeypatch):
    from distributed import LocalCluster

    from flows.detect import detect
    from mgllava.cli import main

    monkeypatch.delenv("PREFECT_HOME", raising=False)  # main() sets it for this process

    images = tmp_path / "images"
    make_images(images, 7)
    (images / "zero.png").write_bytes(b"")
    s = DetectorSettings(model=boxy, conf=0.25, imgsz=160, batch=4, max_det=8, device="cpu")

    ref = pipeline.run_detection([images], tmp_path / "lib", s, shard_size=3)
    assert ref.manifest["totals"]["boxes"] > 0

    m_local = detect([str(images)], str(tmp_path / "local"), s.to_json(), shard_size=3)
    assert m_local["status"] == "complete" and m_local["totals"]["images"] == 8
    assert m_local["fingerprint"] == ref.manifest["fingerprint"]
    _same(_table(tmp_path / "local"), _table(tmp_path / "lib"))

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1", protocol="tcp://",
                      dashboard_address=None) as cluster:
        m_dask = detect([str(images)], str(tmp_path / "dask"), s.to_json(), shard_size=3,
                        dask_address=cluster.scheduler_address)
        # `mgllava detect --dask-address`: the library CLI hands the run to the top floor's flow call
        assert main(["detect", "--source", str(images), "--model", boxy, "--out", str(tmp_path / "cli"),
                     "--conf", "0.25", "--imgsz", "160", "--batch", "4", "--device", "cpu", "--shard-size", "3",
                     "--quiet", "--no-warehouse", "--dask-address", cluster.scheduler_address]) == 0
    assert m_dask["totals"] == m_local["totals"]
    cli_manifest = pipeline.read_manifest(tmp_path / "cli")
    assert cli_manifest["status"] == "complete" and cli_manifest["totals"]["images"] == 8
    assert cli_manifest["totals"]["rejects"] == m_local["totals"]["rejects"]
    _same(_table(tmp_path / "dask"), _table(tmp_path / "local"))

    again = detect([str(images)], str(tmp_path / "local"), s.to_json(), shard_size=3)
    assert again["_skipped"] is True
