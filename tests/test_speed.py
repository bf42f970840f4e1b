"""Overlap and host syncs: detection writes a shard while it detects the next, training loads batches
ahead and reads its loss from the device only at logging steps."""

from __future__ import annotations

import os
import sys
import threading
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_train import _Toy, _toy_collate

from detector import pipeline
from detector.model import DetectorSettings
from mgllava.config import StageConfig
from mgllava.train.engine import prefetch, run_stage

ENGINE_FILE = sys.modules["mgllava.train.engine"].__file__


def _boxes(out):
    table = pq.read_table(out / "boxes").drop_columns(["detected_at"]).sort_by("image_key")
    return table.replace_schema_metadata(None).to_pylist()


def test_detection_writes_a_shard_while_the_next_is_detected(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (96 + 8 * i, 80), (40 * i, 120, 200)).save(images / f"{i}.png")
    settings = DetectorSettings(model="yolo11n.yaml", conf=0.0, imgsz=64, batch=2, max_det=3, device="cpu")
    # the reference table: shard by shard, each written before the next is detected
    with pipeline.run_lock(tmp_path / "sequential") as run_id:
        plan = pipeline.prepare_run([images], tmp_path / "sequential", settings, shard_size=2, run_id=run_id)
        for index in plan.pending:
            pipeline.run_shard(plan.out, index)

    done = []
    next_shard_detected = threading.Event()
    real_write = pipeline.write_shard

    def slow_write(out, index, *args):  # shard 0's write waits until shard 1 has been detected
        if index == 0:
            done.append(next_shard_detected.wait(timeout=60))
        real_write(out, index, *args)

    def progress(images_done, total):
        if images_done > 2:
            next_shard_detected.set()

    monkeypatch.setattr(pipeline, "write_shard", slow_write)
    result = pipeline.run_detection([images], tmp_path / "overlapped", settings, shard_size=2, progress=progress)
    assert done == [True]  # the write did not hold up the detection of the next shard
    assert result.manifest["status"] == "complete" and result.manifest["totals"]["rows"] == 6
    assert _boxes(tmp_path / "overlapped") == _boxes(tmp_path / "sequential")


def test_prefetch_reads_ahead_keeps_order_and_raises_where_the_error_was():
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i
        raise ValueError("item 5 is broken")

    loaded = prefetch(items(), depth=2)
    assert next(loaded) == 0
    deadline = time.monotonic() + 10
    while len(produced) < 3 and time.monotonic() < deadline:  # 1 and 2 load while 0 is in use
        time.sleep(0.01)
    assert produced == [0, 1, 2]
    assert [next(loaded) for _ in range(4)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="item 5 is broken"):
        next(loaded)


def test_prefetch_runs_torch_on_one_thread_and_leaves_the_callers_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the training thread's count (two cores), whatever the test process had
    try:
        counts = list(prefetch(torch.get_num_threads() for _ in range(3)))  # read inside the producer thread
        assert counts == [1, 1, 1]  # no second team of two OpenMP threads beside the step's
        assert torch.get_num_threads() == 2
        deadline = time.monotonic() + 10
        while any(t.name == "prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start(), later.join()
        assert seen == [2]  # the process's default is back once the producer has ended
    finally:
        torch.set_num_threads(threads)


class _ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        x = torch.randn(4, generator=torch.Generator().manual_seed(index))
        return x, x.sum(0, keepdim=True)


def test_training_reads_the_loss_only_at_logging_steps_and_uses_fused_adamw(tmp_path, monkeypatch):
    stage = StageConfig(global_batch=2, micro_batch=1, lr=0.05, epochs=1, save_every=100, log_every=4)
    syncs = []  # host reads of a tensor made by the engine's own code

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == ENGINE_FILE:
                syncs.append(name)
            return real(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    fused = []
    real_init = torch.optim.AdamW.__init__

    def init(self, params, *args, **kwargs):
        fused.append(kwargs.get("fused"))
        real_init(self, params, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", init)
    logged = []
    torch.manual_seed(0)
    prefetched = run_stage(_Toy(), _ToyData(), _toy_collate, stage, "pretrain", tmp_path / "a", seed=0,
                           progress=False, on_metrics=logged.append)
    assert prefetched.steps == 8
    assert len(syncs) == 2, syncs  # one read per logging step (4 and 8), none per micro-batch
    assert [[m.step for m in rows] for rows in logged] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # written in batches
    assert fused == [True]

    torch.manual_seed(0)  # the same run with a worker process loading the batches: the same losses
    with_worker = run_stage(_Toy(), _ToyData(), _toy_collate, stage, "pretrain", tmp_path / "b", seed=0,
                            progress=False, num_workers=1)
    assert [m.loss for m in with_worker.metrics] == [m.loss for m in prefetched.metrics]


def test_evaluations_prepare_thread_leaves_the_callers_count_and_the_default():
    """The prepare pool's threads run torch on one thread; the caller keeps its count, and threads started
    after the pool get it again (the pool's initializer once left the whole process's default at 1)."""
    from concurrent.futures import ThreadPoolExecutor

    from mgllava.torch_threads import helpers_on_one_thread

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with helpers_on_one_thread(), ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            assert pool.submit(torch.get_num_threads).result() == 1
            assert torch.get_num_threads() == 2
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start(), later.join()
        assert seen == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
