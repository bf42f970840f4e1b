"""What users see: the pictures (real PNGs of the expected content), the progress hooks, and the
flows' artifacts and log lines in Prefect (a temporary server; the UI itself in ``test_ui_check.py``)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from PIL import Image

from mgllava import plots


def _png(path, size=None) -> np.ndarray:
    """The decoded PNG as RGB pixels; it must be a PNG, of ``size`` when given, and not blank."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        if size:
            assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    return pixels


def test_loss_curves_score_chart_and_history_are_pngs(tmp_path):
    steps = [(stage, s, 2.0 / s, 1e-3 * min(1, s / 3)) for stage in ("finetune", "pretrain") for s in range(1, 11)]
    _png(plots.loss_curves(steps, tmp_path / "loss.png"), size=(1000, 360))  # one 5 x 3.6 in panel per stage
    with pytest.raises(ValueError, match="no training steps"):
        plots.loss_curves([], tmp_path / "none.png")

    scores = [{"task": "pope", "metric": "pope_accuracy", "value": 0.73},
              {"task": "pope", "metric": "pope_f1_score", "value": 0.76},
              {"task": "mmbench", "metric": "gpt_eval_score", "value": 29.8},  # percent: charted as 0.298
              {"task": "textvqa", "metric": "exact_match", "value": None}]
    assert plots._headlines(scores) == {"pope": ("pope_accuracy", 0.73), "mmbench": ("gpt_eval_score", 0.298)}
    pixels = _png(plots.score_chart(scores, tmp_path / "scores.png"))
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 50  # the chance marks

    now = dt.datetime(2026, 11, 30, 8, 0)
    history = [(now + dt.timedelta(hours=h), "pope", "pope_accuracy", 0.5 + 0.1 * h) for h in range(3)]
    _png(plots.score_history(history + [(now, "mmbench", "gpt_eval_score", 25.0)], tmp_path / "history.png"))


def test_boxes_are_drawn_where_the_detections_are(tmp_path):
    image = Image.new("RGB", (200, 160), (255, 255, 255))
    detections = [(20.0, 30.0, 120.0, 110.0, 0.9, "circle"), (130.0, 40.0, 190.0, 150.0, 0.5, "square")]
    pixels = _png(plots.boxed_image(image, detections, tmp_path / "boxed.png"), size=(200, 160))
    assert (pixels[70, 20] != 255).any() and (pixels[70, 119] != 255).any()  # left and right edges of box 1
    assert (pixels[70, 70] == 255).all()  # inside a box: untouched
    assert (pixels[5, 5] == 255).all()  # outside: untouched
    assert not (pixels[70, 20] == pixels[100, 130]).all()  # each label its own colour

    gallery = plots.detection_gallery([(image, detections, "a.png"), (image, detections[:1], "b.png"),
                                       (image, [], "c.png")], tmp_path / "gallery.png", tile=128, columns=2)
    _png(gallery, size=(256, 2 * (128 + 18)))


def test_results_plot_draws_the_score_history(tmp_path, capsys):
    from mgllava.cli import main
    from warehouse.db import connect

    db = tmp_path / "wh.duckdb"
    with connect(db) as con:
        for day, (pope, mmbench) in enumerate([(0.6, 24.0), (0.7, 30.0), (0.73, 29.8)], start=1):
            for task, metric, value in (("pope", "pope_accuracy", pope), ("mmbench", "gpt_eval_score", mmbench)):
                con.execute("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, false)",
                            [f"run{day}", f"/ckpt{day}", task, metric, value, 10, dt.datetime(2026, 11, day, 9)])
    png = tmp_path / "history.png"
    assert main(["results", "--warehouse", str(db), "--plot", str(png)]) == 0
    assert f"score history (6 scores) drawn in {png}" in capsys.readouterr().out
    _png(png, size=(750, 400))
    assert main(["results", "--warehouse", str(db), "--plot", str(tmp_path / "history.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plot" in err[0] and "does not end in .png" in err[0]


def test_training_step_lines_are_read_back_as_progress():
    from mgllava.train.engine import STEP_LINE
    from mgllava.train.launch import STEP_PATTERN

    line = "2026-11-30 08:00:00 INFO mgllava.train.engine: " + STEP_LINE % ("finetune", 3, 12, 0.4321, 2e-5, 7.5)
    found = STEP_PATTERN.search(line)
    assert found.groupdict() == {"stage": "finetune", "step": "3", "total": "12", "loss": "0.4321",
                                 "lr": "2.000e-05", "samples_per_s": "7.50"}


# ----------------------------------------------------------------------------- the flows' reports





def _run(flow_fn, **kwargs):
    """Call a flow; ``(its result, its flow run id)``."""
    state = flow_fn(**kwargs, return_state=True)
    return state.result(), state.state_details.flow_run_id


def _artifacts(flow_run_id) -> dict:
    """``{key: artifact}`` of a flow run (its tasks' included)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def _logs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the logs still queued in this process
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def _embedded_png(artifact) -> bytes:
    import base64
    import re

    found = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", artifact.data)
    assert found, artifact.data[:200]
    return base64.b64decode(found.group(1))


@pytest.mark.slow
def test_detect_flow_reports_its_shards_and_a_gallery(prefect_server, boxy, tiny_world, tmp_path):
    from detector.model import DetectorSettings
    from flows.detect import detect_flow

    settings = DetectorSettings(model=boxy, conf=0.05, imgsz=160, device="cpu").to_json()
    manifest, run = _run(detect_flow, sources=[str(tiny_world / "images" / "bench")], out=str(tmp_path / "boxes"),
                         settings=settings, shard_size=4)
    artifacts = _artifacts(run)
    assert artifacts["detect-progress"].data == 100.0
    png = tmp_path / "boxes" / "gallery.png"
    assert _embedded_png(artifacts["box-table"]) == png.read_bytes()
    _png(png)
    assert f"| {manifest['totals']['images']} |" in artifacts["box-table"].data and "file://" not in artifacts["box-table"].data
    shard_lines = [log for log in _logs(run) if log.name == "detector.pipeline" and log.message.startswith("shard ")]
    assert len(shard_lines) == manifest["totals"]["images"] // 4 + bool(manifest["totals"]["images"] % 4)
    assert all(log.task_run_id for log in shard_lines)  # in the detect-shard tasks' own logs


@pytest.mark.slow
def test_training_flows_report_progress_and_loss_curves(prefect_server, tiny_config, tmp_path):
    from flows.train import finetune, pretrain
    from mgllava.train.job import stage_dir

    config = tiny_config.model_copy(deep=True)
    config.train.pretrain.max_steps = config.train.finetune.max_steps = 2
    config.train.pretrain.log_every = config.train.finetune.log_every = 1  # the preset's finetune logs every 10th
    config_file = str(config.save(tmp_path / "config.yaml"))
    for flow_fn, stage in ((pretrain, "pretrain"), (finetune, "finetune")):
        result, run = _run(flow_fn, config_file=config_file)
        artifacts = _artifacts(run)
        steps = result["steps"]  # at most 2 (the test world's pretrain corpus makes one step)
        assert artifacts[f"{stage}-progress"].data == 100.0
        assert f"{stage} step {steps}/{steps}: loss" in artifacts[f"{stage}-progress"].description
        loss_png = stage_dir(config, stage) / "loss.png"
        assert _embedded_png(artifacts["loss-curves"]) == loss_png.read_bytes()
        _png(loss_png, size=(500, 360))  # one panel: this stage's
        lines = [log.message for log in _logs(run)]
        assert sum(f"{stage} step " in m and "samples/s" in m for m in lines) == steps  # each logged step, live
        assert not [m for m in lines if f"{stage}:" in m and "step/s]" in m]  # no refreshes of our bar in the log


@pytest.mark.slow
def test_evaluate_flow_reports_progress_and_scores(prefect_server, tiny_config, exported, boxy, tmp_path):
    from flows.evaluate import evaluate

    model_dir = exported
    overrides = [f"work_dir={tiny_config.work_dir}", f"detector.model={boxy}", "detector.imgsz=160",
                 "eval.max_new_tokens=2", "eval.limit=4", "data.boxes_dir=" + str(tmp_path / "no-table")]
    config_file = str(tiny_config.save(tmp_path / "config.yaml"))
    rows, run = _run(evaluate, model_dir=model_dir, config_file=config_file, overrides=overrides,
                     benchmarks=["pope"], run_id="eval-reports", warehouse=str(tmp_path / "wh.duckdb"))
    assert {r["status"] for r in rows} == {"completed"}
    artifacts = _artifacts(run)
    assert artifacts["evaluate-progress"].data == 100.0
    png = tmp_path / "work" / "eval" / "eval-reports" / "scores.png"
    assert _embedded_png(artifacts["scores"]) == png.read_bytes()
    _png(png)
    runner_lines = [log for log in _logs(run) if log.name == "mgllava.eval.runner"]
    assert any(log.message.startswith("benchmark pope: 4 samples") and log.task_run_id for log in runner_lines)


@pytest.mark.slow
def test_full_train_does_not_send_prints_to_the_logs(prefect_server, tmp_path):
    """`datasets` pickles with dill, which disassembles functions with print(): under log_prints that
    bytecode went to the run's logs. The full-train flow keeps log_prints off."""
    import datasets
    from prefect import flow

    from flows.full_train import full_train

    @flow(log_prints=full_train.log_prints)
    def save_a_dataset():
        datasets.Dataset.from_dict({"a": [1, 2]}).save_to_disk(str(tmp_path / "d"))

    _, run = _run(save_a_dataset)
    assert not [log.message for log in _logs(run) if "LOAD_" in log.message or "RESUME" in log.message]


@pytest.mark.slow
def test_chat_save_draws_the_boxes_the_model_sees(exported, boxy, tiny_world, tmp_path, capsys):
    from mgllava.cli import main

    image = sorted((tiny_world / "images" / "bench").glob("*.png"))[0]
    png = tmp_path / "boxed.png"
    assert main(["chat", "--model", exported, "--image", str(image), "--detector", boxy, "--set", "detector.imgsz=160",
                 "--set", f"work_dir={tmp_path}", "--max-new-tokens", "2", "--save", str(png), "Is there a circle?"]) == 0
    out = capsys.readouterr().out
    n_boxes = int(out.splitlines()[0].split()[0])
    assert n_boxes > 0 and f"boxes drawn in {png}" in out
    with Image.open(image) as original:
        before = np.asarray(original.convert("RGB"))
    after = _png(png, size=(before.shape[1], before.shape[0]))
    assert (after != before).any(axis=2).mean() > 0.01  # the boxes changed the picture


def _log_in_child() -> None:
    import logging

    logging.getLogger("mgllava.shapes.zoo").info("tiny LLM text pretraining: a line from the child")


@pytest.mark.slow
def test_a_child_process_logs_into_the_run(prefect_server, monkeypatch):
    """The kit's LLM trains in a spawned child (mgllava.shapes.BackgroundZoo): its lines reach the run's logs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    from flows import reports

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # what a worker's flow run has

    @flow
    def with_a_child():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=reports.child_logging()) as pool:
            pool.submit(_log_in_child).result()

    _, run = _run(with_a_child)
    lines = [log for log in _logs(run) if log.name == "mgllava.shapes.zoo"]
    assert [log.message for log in lines] == ["tiny LLM text pretraining: a line from the child"]
