"""Evaluation batches: the next batch is prepared while one generates, and answers match batch size 1."""

from __future__ import annotations

import gc
import threading

import pytest


@pytest.mark.slow  # two lmms-eval runs of 7 POPE questions on the tiny export (~20 s)
def test_batched_run_prepares_ahead_and_answers_as_batch_size_one(exported, boxy, tiny_world, tmp_path,
                                                                 monkeypatch):
    from detector.model import DetectorSettings
    from mgllava.eval.lmms_model import MGLLaVALmms
    from mgllava.eval.runner import run_benchmark
    from mgllava.eval.tasks import BENCHMARKS, TaskPlan, write_task_files

    bench = BENCHMARKS["pope"]
    plan = TaskPlan(bench.name, bench.task, "ready", data_dir=str(tiny_world / "bench" / bench.name))
    include = write_task_files([plan], tmp_path / "tasks")
    kwargs = {"pretrained": exported, "detector": DetectorSettings(model=boxy, imgsz=160, device="cpu"),
              "detection_cache": str(tmp_path / "detections"), "max_new_tokens": 3}

    # record which thread prepares each batch, and hold the k-th generate call until batch k+1's
    # preparation has begun (without preparation ahead it never begins while a batch generates)
    prepare, generate = MGLLaVALmms._prepare, MGLLaVALmms._generate
    threads, generated, progress = [], [], threading.Condition()

    def recorded_prepare(self, requests):
        with progress:
            threads.append(threading.current_thread().name)
            progress.notify_all()
        return prepare(self, requests)

    def held_generate(self, inputs, max_new_tokens):
        n_batches = -(-7 // self.batch_size)
        with progress:
            assert progress.wait_for(lambda: len(threads) >= min(len(generated) + 2, n_batches), timeout=30), \
                "the next batch was not prepared while this one generated"
        generated.append(len(inputs["input_ids"]))
        return generate(self, inputs, max_new_tokens)

    collections = []  # lmms-eval's clean() after a task must not run a full gc.collect() (~0.7 s of CPU)
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or 0)
    monkeypatch.setattr(MGLLaVALmms, "_prepare", recorded_prepare)
    monkeypatch.setattr(MGLLaVALmms, "_generate", held_generate)
    runs = {}
    for batch_size in (1, 3):
        threads.clear()
        generated.clear()
        runs[batch_size] = run_benchmark(plan, include, {**kwargs, "batch_size": batch_size}, 7, tmp_path / "out")
        assert runs[batch_size].status == "completed", runs[batch_size].reason
        assert generated == [batch_size] * (7 // batch_size) + [7 % batch_size] * (7 % batch_size > 0)
        assert len(threads) == len(generated) and all(t.startswith("mgllava-prepare") for t in threads)
        assert 0 < runs[batch_size].generate_seconds < runs[batch_size].seconds
        assert collections == []
    assert runs[1].box_origins["detector"] > 0 and runs[3].box_origins["cache"] == 7  # the same boxes
    answers = {b: {p["doc_id"]: (p["prediction"], p["n_boxes"]) for p in r.predictions} for b, r in runs.items()}
    assert len(answers[1]) == 7 and all(n > 0 for _, n in answers[1].values())
    assert answers[3] == answers[1]
