"""Detection stage: inputs, Parquet box tables, rejects, resume/idempotence, detectors, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from detector import pipeline, schema
from detector.errors import DetectorError, RunConflictError
from detector.model import DetectorSettings

COLORS = [(220, 30, 30), (30, 160, 50), (30, 70, 220), (235, 195, 0)]


def draw_image(seed: int, w: int = 160, h: int = 128) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), (240, 240, 235))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):
        s = int(rng.integers(16, 40))
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        color = COLORS[int(rng.integers(0, len(COLORS)))]
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + s, y + s], fill=color)
    return im


def make_images(folder, n: int, start: int = 0, sub: str = "") -> list[str]:
    keys = []
    for i in range(start, start + n):
        key = f"{sub}{i:04d}.png"
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_image(i, 128 + 8 * (i % 5), 112 + 8 * (i % 3)).save(path)
        keys.append(key)
    return keys


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()



def settings(model: str = "yolo11n.yaml", **kw) -> DetectorSettings:
    base = dict(model=model, conf=0.25, imgsz=160, batch=4, max_det=10, device="cpu")
    base.update(kw)
    return DetectorSettings(**base)


def read_boxes(out):
    return pq.read_table(out / "boxes").sort_by("image_key")


def read_rejects(out):
    return pq.read_table(out / "rejects").sort_by("image_key")


# --------------------------------------------------------------------------- schema and values


def test_schema_and_values(tmp_path, boxy):
    images = tmp_path / "images"
    keys = make_images(images, 10)
    threads = torch.get_num_threads()
    res = pipeline.run_detection([images], tmp_path / "out", settings(boxy), shard_size=4)
    assert torch.get_num_threads() == threads  # Ultralytics' CPU setting does not outlive detection
    out = res.out
    assert res.computed_shards == [0, 1, 2] and not res.skipped
    assert sorted(p.name for p in (out / "boxes").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]

    for f in (out / "boxes").iterdir():
        s = pq.read_schema(f)
        assert s.metadata[schema.META_SCHEMA_VERSION] == schema.SCHEMA_VERSION.encode()
        assert s.metadata[schema.META_RUN] == res.manifest["fingerprint"].encode()
        assert [(x.name, x.type) for x in s] == [(x.name, x.type) for x in schema.BOXES_FIELDS]
    assert pq.read_schema(out / "rejects" / "part-00000.parquet").metadata[schema.META_TABLE] == b"box_rejects"

    table = read_boxes(out)
    assert table["image_key"].to_pylist() == sorted(keys)
    rows = table.to_pylist()
    total_boxes = 0
    for row in rows:
        path = images / row["image_key"]
        with Image.open(path) as im:
            assert (row["width"], row["height"]) == im.size
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["detector"] == "YOLO:boxy"
        params = json.loads(row["params"])
        assert params["conf"] == 0.25 and params["imgsz"] == 160 and params["max_det"] == 10
        assert 0 < len(row["boxes"]) <= 10
        total_boxes += len(row["boxes"])
        scores = [b["score"] for b in row["boxes"]]
        assert scores == sorted(scores, reverse=True)
        for b in row["boxes"]:
            assert 0 <= b["x1"] <= b["x2"] <= row["width"] and 0 <= b["y1"] <= b["y2"] <= row["height"]
            assert 0.25 <= b["score"] <= 1.0
            assert isinstance(b["label"], str) and b["label"]
    assert len(set(table["weights_sha256"].to_pylist())) == 1
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["schema_version"] == schema.SCHEMA_VERSION
    assert m["totals"]["rows"] == 10 and m["totals"]["rejects"] == 0 and m["totals"]["boxes"] == total_boxes
    assert [s["index"] for s in m["shards"]] == [0, 1, 2] and [s["images"] for s in m["shards"]] == [4, 4, 2]
    assert m["detector"]["weights_sha256"] == hashlib.sha256(open(boxy, "rb").read()).hexdigest()


def test_no_detections_are_rows_with_empty_lists(tmp_path):
    images = tmp_path / "images"
    make_images(images, 3)
    res = pipeline.run_detection([images], tmp_path / "out", settings(conf=0.99), shard_size=8)
    table = read_boxes(res.out)
    assert table.num_rows == 3
    assert table["boxes"].to_pylist() == [[], [], []]
    assert res.manifest["totals"]["images_without_boxes"] == 3


def test_llava_json_dedup_and_keys(tmp_path):
    root = tmp_path / "root"
    make_images(root, 3, sub="train/")
    entries = [
        {"id": "a", "image": "train/0000.png", "conversations": []},
        {"id": "b", "image": "./train/0000.png", "conversations": []},  # same image, other spelling
        {"id": "c", "image": "train/0001.png", "conversations": []},
        {"id": "d", "conversations": []},  # text-only
        {"id": "e", "image": "train/9999.png", "conversations": []},  # missing file
    ]
    (tmp_path / "corpus.json").write_text(json.dumps(entries))
    entries2 = [{"id": "x", "image": "train/0002.png", "conversations": []}, entries[0]]
    (tmp_path / "corpus2.json").write_text(json.dumps(entries2))
    res = pipeline.run_detection(
        [tmp_path / "corpus.json", tmp_path / "corpus2.json"], tmp_path / "out", settings(conf=0.99),
        image_root=root,
    )
    m = res.manifest
    assert m["inputs"]["references"] == 6 and m["inputs"]["distinct_images"] == 4 and m["inputs"]["duplicates"] == 2
    assert m["inputs"]["sources"][0]["text_only"] == 1
    assert read_boxes(res.out)["image_key"].to_pylist() == ["train/0000.png", "train/0001.png", "train/0002.png"]
    rej = read_rejects(res.out).to_pylist()
    assert [(r["image_key"], r["reason"]) for r in rej] == [("train/9999.png", "missing")]
    assert m["totals"]["rows"] + m["totals"]["rejects"] == m["inputs"]["distinct_images"]


def test_bad_images_become_rejects(tmp_path):
    images = tmp_path / "images"
    make_images(images, 3)
    good = png_bytes(draw_image(7, 200, 150))
    (images / "empty.png").write_bytes(b"")
    (images / "corrupt.png").write_bytes(b"this is not an image at all")
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (300, 300), (10, 20, 30)).save(images / "huge.png")  # > max_image_pixels below
    (images / "folder.png").mkdir()  # not a file (folders are not listed: referenced from JSON below)
    corpus = [{"image": k} for k in ["0000.png", "empty.png", "corrupt.png", "truncated.png", "huge.png",
                                     "folder.png", "gone.png"]]
    (tmp_path / "c.json").write_text(json.dumps(corpus))
    res = pipeline.run_detection(
        [tmp_path / "c.json", images], tmp_path / "out", settings(conf=0.99, max_image_pixels=250 * 250),
        image_root=images, shard_size=3,
    )
    reasons = {r["image_key"]: r["reason"] for r in read_rejects(res.out).to_pylist()}
    assert reasons == {
        "empty.png": "empty", "corrupt.png": "unreadable", "truncated.png": "truncated", "huge.png": "too_large",
        "folder.png": "not_a_file", "gone.png": "missing",
    }
    details = {r["image_key"]: r["detail"] for r in read_rejects(res.out).to_pylist()}
    assert "90000 pixels > 62500" in details["huge.png"]
    assert read_boxes(res.out)["image_key"].to_pylist() == ["0000.png", "0001.png", "0002.png"]
    t = res.manifest["totals"]
    assert t["rows"] == 3 and t["rejects"] == 6 and t["images"] == 9 == res.manifest["inputs"]["distinct_images"]
    assert t["reject_reasons"]["too_large"] == 1


# --------------------------------------------------------------------------- resume and idempotence


def test_resume_after_kill_redoes_only_missing_shards(tmp_path, monkeypatch):
    images = tmp_path / "images"
    make_images(images, 10)
    out = tmp_path / "out"
    s = settings(conf=0.99)
    real_write = pipeline.atomic_write_table
    calls = []

    def dying_write(table, path):
        calls.append(path.relative_to(out).as_posix())
        if len(calls) == 4:  # plan, shard 0 rejects, shard 0 boxes, then die writing shard 1
            raise KeyboardInterrupt("simulated kill")
        real_write(table, path)

    monkeypatch.setattr(pipeline, "atomic_write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_detection([images], out, s, shard_size=4)
    assert calls == ["plan.parquet", "rejects/part-00000.parquet", "boxes/part-00000.parquet",
                     "rejects/part-00001.parquet"]
    monkeypatch.setattr(pipeline, "atomic_write_table", real_write)
    assert sorted(p.name for p in (out / "boxes").iterdir()) == ["part-00000.parquet"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    # a killed writer can also leave a temporary file behind
    stale = out / "boxes" / ".part-00001.parquet.tmp-999-dead"
    stale.write_bytes(b"partial")
    shard0_mtime = (out / "boxes" / "part-00000.parquet").stat().st_mtime_ns

    computed = []
    real_run_shard = pipeline.run_shard

    def spy(o, index, progress=None, **kwargs):
        r = real_run_shard(o, index, progress, **kwargs)
        computed.append((index, r.computed))
        return r

    monkeypatch.setattr(pipeline, "run_shard", spy)
    res = pipeline.run_detection([images], out, s, shard_size=4)
    assert res.computed_shards == [1, 2] and computed == [(1, True), (2, True)]
    assert not stale.exists()
    assert (out / "boxes" / "part-00000.parquet").stat().st_mtime_ns == shard0_mtime
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    keys = read_boxes(out)["image_key"].to_pylist()
    assert len(keys) == len(set(keys)) == 10
    assert res.manifest["runs"][-1]["computed_shards"] == [1, 2]


def test_second_run_is_skipped_and_adds_nothing(tmp_path, caplog):
    images = tmp_path / "images"
    make_images(images, 5)
    s = settings(conf=0.99)
    first = pipeline.run_detection([images], tmp_path / "out", s, shard_size=2)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.parquet")}
    with caplog.at_level(logging.INFO, logger="detector.pipeline"):
        second = pipeline.run_detection([images], tmp_path / "out", s, shard_size=2)
    assert second.skipped and second.computed_shards == []
    assert "already complete" in caplog.text and "skipped" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.parquet")} == before
    assert read_boxes(tmp_path / "out").num_rows == 5
    assert second.manifest["fingerprint"] == first.manifest["fingerprint"]

    # new inputs: a different run, refused in the same directory unless overwritten
    make_images(images, 1, start=5)
    with pytest.raises(RunConflictError, match="another run"):
        pipeline.run_detection([images], tmp_path / "out", s, shard_size=2)
    third = pipeline.run_detection([images], tmp_path / "out", s, shard_size=2, overwrite=True)
    assert not third.skipped and read_boxes(tmp_path / "out").num_rows == 6


# --------------------------------------------------------------------------- benchmark sets


def test_benchmark_dataset_source(tmp_path):
    import datasets

    ims = [draw_image(i) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"question_id": ["q1", "q/2", "q3"], "image": ims, "question": ["a", "b", "c"]},
        features=datasets.Features(
            {"question_id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string")}
        ),
    )
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "bench" / "pope"))
    res = pipeline.run_detection([tmp_path / "bench"], tmp_path / "out", settings(conf=0.99),
                                 image_root=tmp_path / "root")
    table = read_boxes(res.out)
    assert table["image_key"].to_pylist() == ["bench/pope/q/2.png", "bench/pope/q1.png", "bench/pope/q3.png"]
    stored = datasets.load_from_disk(str(tmp_path / "bench" / "pope"))["test"].cast_column(
        "image", datasets.Image(decode=False))
    by_key = dict(zip(table["image_key"].to_pylist(), table["sha256"].to_pylist(), strict=True))
    assert by_key["bench/pope/q1.png"] == hashlib.sha256(stored[0]["image"]["bytes"]).hexdigest()
    assert (tmp_path / "root" / "bench" / "pope" / "q1.png").is_file()
    assert res.manifest["inputs"]["sources"][0]["task"] == "pope"


# --------------------------------------------------------------------------- detectors


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(DetectorError, match="not found"):
        pipeline.run_detection([tmp_path], tmp_path / "out", settings(str(tmp_path / "nope.pt")))


def test_closed_set_class_filter(tmp_path, boxy):
    images = tmp_path / "images"
    make_images(images, 2)
    res = pipeline.run_detection([images], tmp_path / "out", settings(boxy, classes=("0", "5")))
    labels = {b["label"] for row in read_boxes(res.out)["boxes"].to_pylist() for b in row}
    assert labels and labels <= {"0", "5"}
    with pytest.raises(DetectorError, match="closed-set"):
        pipeline.run_detection([images], tmp_path / "out2", settings(boxy, classes=("unicorn",)))


def test_yoloe_prompts_need_embeddings(tmp_path):
    import torch

    images = tmp_path / "images"
    make_images(images, 2)
    with pytest.raises(DetectorError, match="class-embeddings"):
        pipeline.run_detection([images], tmp_path / "o1", settings("yoloe-11s.yaml", classes=("cat", "dog")))
    from ultralytics import YOLO

    dim = YOLO("yoloe-11s.yaml").model.model[-1].embed
    torch.save(torch.randn(2, dim), tmp_path / "emb.pt")
    res = pipeline.run_detection(
        [images], tmp_path / "o2",
        settings("yoloe-11s.yaml", classes=("cat", "dog"), class_embeddings=str(tmp_path / "emb.pt"), conf=0.001),
    )
    assert res.manifest["detector"]["arch"] == "YOLOE" and res.manifest["detector"]["names"] == {"0": "cat", "1": "dog"}
    labels = {b["label"] for row in read_boxes(res.out)["boxes"].to_pylist() for b in row}
    assert labels <= {"cat", "dog"}
    assert json.loads(read_boxes(res.out)["params"][0].as_py())["classes"] == ["cat", "dog"]


def test_yolo_world_with_embeddings(tmp_path):
    import torch

    images = tmp_path / "images"
    make_images(images, 1)
    torch.save(torch.randn(3, 512), tmp_path / "emb.pt")
    res = pipeline.run_detection(
        [images], tmp_path / "o",
        settings("yolov8s-worldv2.yaml", classes=("a", "b", "c"), class_embeddings=str(tmp_path / "emb.pt"),
                 conf=0.001),
    )
    assert res.manifest["detector"]["arch"] == "YOLOWorld"
    labels = {b["label"] for row in read_boxes(res.out)["boxes"].to_pylist() for b in row}
    assert labels <= {"a", "b", "c"}


def test_rtdetr_yaml(tmp_path):
    images = tmp_path / "images"
    make_images(images, 1)
    res = pipeline.run_detection([images], tmp_path / "o", settings("rtdetr-l.yaml", imgsz=160, conf=0.0))
    assert res.manifest["detector"]["arch"] == "RTDETR" and res.manifest["totals"]["rows"] == 1
    boxes = read_boxes(res.out)["boxes"][0].as_py()
    assert boxes and all(0 <= b["x1"] <= b["x2"] <= 128 for b in boxes)


# --------------------------------------------------------------------------- CLI


def test_cli_detect_and_warehouse(tmp_path, capsys, monkeypatch):
    from mgllava.cli import main

    monkeypatch.setenv("MGLLAVA_HOME", str(tmp_path / "home"))
    images = tmp_path / "images"
    make_images(images, 4)
    (images / "broken.png").write_bytes(b"")
    args = ["detect", "--source", str(images), "--model", "yolo11n.yaml", "--out", str(tmp_path / "out"),
            "--conf", "0.99", "--imgsz", "160", "--quiet"]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("detect: 5 images: 4 with box rows (0 boxes), 1 rejects")
    import duckdb

    con = duckdb.connect(str(tmp_path / "home" / "warehouse.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM box_images WHERE n_boxes = 0").fetchone()[0] == 4
    assert con.execute("SELECT n_images, n_rejects FROM box_runs").fetchall() == [(5, 1)]
    con.close()
    assert main(args) == 0
    assert "already complete, skipped" in capsys.readouterr().out
    bad = ["detect", "--source", str(images), "--model", str(tmp_path / "missing.pt"), "--out",
           str(tmp_path / "o2"), "--quiet", "--no-warehouse"]
    assert main(bad) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_module_is_light():
    code = "import sys, detector.cli; bad = [m for m in ('torch', 'ultralytics') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- loading ahead


def test_a_loader_pool_writes_the_same_tables_as_decoding_between_forwards(tmp_path):
    images = tmp_path / "images"
    make_images(images, 10)
    (images / "corrupt.png").write_bytes(b"this is not an image at all")
    columns = ["image_key", "width", "height", "sha256", "boxes", "shard"]
    tables = {}
    for threads in (0, 3):
        res = pipeline.run_detection([images], tmp_path / f"out{threads}", settings(loader_threads=threads),
                                     shard_size=8)  # two shards of two and one batches of 4
        tables[threads] = (read_boxes(res.out).select(columns).to_pylist(),
                           read_rejects(res.out).select(["image_key", "reason", "shard"]).to_pylist())
        assert res.manifest["totals"]["rows"] + res.manifest["totals"]["rejects"] == 11
    assert tables[3] == tables[0]
    assert [r["image_key"] for r in tables[0][1]] == ["corrupt.png"]


def test_images_are_loaded_ahead_on_a_gpu_and_between_forwards_on_a_cpu(tmp_path):
    assert pipeline.loader_threads_for(settings(), "cpu") == 0
    assert 1 <= pipeline.loader_threads_for(settings(), "0") <= 8
    assert pipeline.loader_threads_for(settings(loader_threads=5), "cpu") == 5
    make_images(tmp_path, 9)
    items = [(p.name, str(p)) for p in sorted(tmp_path.glob("*.png"))]
    loaded = list(pipeline._loaded_batches(items, settings(), threads=2))
    assert [len(batch) for batch in loaded] == [4, 4, 1]
    assert [image.key for batch in loaded for image in batch] == [key for key, _ in items]
