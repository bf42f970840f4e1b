"""Evaluation batches: the next batch is prepared while one generates, each image goes through the frozen
towers once, and answers match batch size 1 without the feature cache."""

from __future__ import annotations

import gc
import threading

import pytest


@pytest.mark.slow  # three lmms-eval runs of 7 POPE questions (4 images) on the tiny export (~30 s)
def test_batched_run_prepares_ahead_encodes_each_image_once_and_answers_as_batch_size_one(
        exported, boxy, tiny_world, tmp_path, monkeypatch):
    from detector.model import DetectorSettings
    from mgllava.eval.lmms_model import MGLLaVALmms, load_model
    from mgllava.eval.runner import run_benchmark
    from mgllava.eval.tasks import BENCHMARKS, TaskPlan, write_task_files

    bench = BENCHMARKS["pope"]
    plan = TaskPlan(bench.name, bench.task, "ready", data_dir=str(tiny_world / "bench" / bench.name))
    include = write_task_files([plan], tmp_path / "tasks")
    kwargs = {"pretrained": exported, "detector": DetectorSettings(model=boxy, imgsz=160, device="cpu"),
              "detection_cache": str(tmp_path / "detections"), "max_new_tokens": 3}

    # record which thread prepares each batch, and hold the k-th generate call until batch k+1's
    # preparation has begun (without preparation ahead it never begins while a batch generates)
    prepare, generate, image_features = MGLLaVALmms._prepare, MGLLaVALmms._generate, MGLLaVALmms._image_features
    threads, generated, progress = [], [], threading.Condition()
    cached = []  # the feature cache's size after each batch

    def recorded_image_features(self, prepared):
        features = image_features(self, prepared)
        cached.append(len(self.feature_cache))
        return features

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
        generated.append(len(inputs["questions"]))
        return generate(self, inputs, max_new_tokens)

    collections = []  # lmms-eval's clean() after a task must not run a full gc.collect() (~0.7 s of CPU)
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or 0)
    monkeypatch.setattr(MGLLaVALmms, "_prepare", recorded_prepare)
    monkeypatch.setattr(MGLLaVALmms, "_generate", held_generate)
    monkeypatch.setattr(MGLLaVALmms, "_image_features", recorded_image_features)
    model, _ = load_model(exported, "cpu")  # the runs' model (loaded once per process)
    encoded = {"low": [], "high": []}  # images per call of each frozen tower
    hooks = [model.low_res_encoder.register_forward_hook(lambda m, args, out: encoded["low"].append(len(args[0]))),
             model.high_res_encoder.register_forward_hook(lambda m, args, out: encoded["high"].append(len(args[0])))]
    runs, towers = {}, {}
    try:
        # the first 7 POPE questions ask about 4 images, 2 questions each (the last 1); feature_cache=0 keeps none
        for batch_size, cache in ((1, 0), (3, 2), (1, 256)):
            for recorded in (threads, generated, cached, *encoded.values()):
                recorded.clear()
            run = run_benchmark(plan, include, {**kwargs, "batch_size": batch_size, "feature_cache": cache}, 7,
                                tmp_path / "out")
            assert run.status == "completed", run.reason
            assert generated == [batch_size] * (7 // batch_size) + [7 % batch_size] * (7 % batch_size > 0)
            assert len(threads) == len(generated) and all(t.startswith("mgllava-prepare") for t in threads)
            assert 0 < run.generate_seconds < run.seconds
            assert collections == []
            assert max(cached) <= cache and (cache == 0 or max(cached) == min(cache, 4))  # bounded, and used
            runs[batch_size, cache], towers[batch_size, cache] = run, (sum(encoded["low"]), sum(encoded["high"]))
    finally:
        for hook in hooks:
            hook.remove()
    assert towers == {(1, 0): (7, 7), (3, 2): (4, 4), (1, 256): (4, 4)}  # each question, or each image once
    assert runs[1, 0].box_origins["detector"] > 0 and runs[3, 2].box_origins["cache"] == 7  # the same boxes
    answers = {k: {p["doc_id"]: (p["prediction"], p["n_boxes"]) for p in r.predictions} for k, r in runs.items()}
    assert len(answers[1, 0]) == 7 and all(n > 0 for _, n in answers[1, 0].values())
    assert answers[3, 2] == answers[1, 0] and answers[1, 256] == answers[1, 0]
