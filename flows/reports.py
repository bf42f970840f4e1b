"""What a flow run shows in the Prefect UI: the project's own log lines, progress, tables and pictures.

- :func:`project_logs`: the library's log lines (``mgllava.*``, ``detector.*``, ``warehouse.*``) go to
  the current flow or task run's Prefect logs at INFO, live; chatty third-party loggers (httpx...)
  are held at WARNING. Every flow calls it first.
- :class:`Progress`: a progress artifact of the current run, a ``(fraction, message)`` callable the
  library's ``progress=`` hooks take; the terminal keeps its own progress bars.
- ``publish_*``: one stage's report. Each picture is a PNG (Ultralytics' own plots: PNG or JPEG) written
  into the run's directory and shown in the UI as a markdown artifact that embeds it (a ``data:`` URI: the UI renders it, while a
  ``file://`` link would not open from a browser). No links to local files.
"""

from __future__ import annotations

import base64
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

PROJECT_LOGGERS = ("mgllava", "detector", "warehouse")
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock", "fsspec", "asyncio", "matplotlib", "PIL")


class _InRun(logging.Filter):
    """Pass records made inside a flow or task run (the API handler cannot place the others)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def project_logs() -> None:
    """Send the project's loggers to the current run's Prefect logs at INFO (once per process); third-party
    chatter at WARNING. Loggers Prefect already wired (``PREFECT_LOGGING_EXTRA_LOGGERS``) are kept as they are."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            handler = APILogHandler()
            handler.addFilter(_InRun())
            logger.addHandler(handler)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class _ToRun(logging.Filter):
    """Address records to a given flow (and task) run: for a process that has no run context of its own."""

    def __init__(self, flow_run_id: str, task_run_id: str | None):
        super().__init__()
        self.flow_run_id, self.task_run_id = flow_run_id, task_run_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.flow_run_id, record.task_run_id = self.flow_run_id, self.task_run_id
        return True


class _SentAtOnce(APILogHandler):
    """An API log handler that sends each line before returning (a pool's child process exits without
    running exit handlers, which would drop the lines still queued)."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()


def _send_project_logs(flow_run_id: str, task_run_id: str | None) -> None:
    handler = _SentAtOnce()
    handler.addFilter(_ToRun(flow_run_id, task_run_id))
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
        logger.addHandler(handler)


def child_logging() -> Callable[[], None] | None:
    """For a child process the current run starts: a picklable call that, made in the child, sends the
    project's log lines to this run's Prefect logs (None outside a run)."""
    task_run, flow_run = TaskRunContext.get(), FlowRunContext.get()
    if task_run:
        return functools.partial(_send_project_logs, str(task_run.task_run.flow_run_id), str(task_run.task_run.id))
    if flow_run and flow_run.flow_run:
        return functools.partial(_send_project_logs, str(flow_run.flow_run.id), None)
    return None


class Progress:
    """A progress artifact of the current run; call it with ``(fraction done, message)``.

    Updates are sent at most every ``interval`` seconds (and always at 100%), so a long loop costs few
    API calls."""

    def __init__(self, key: str, description: str, interval: float = 2.0):
        self.interval, self.last = interval, 0.0
        self.id = create_progress_artifact(0.0, key=key, description=description)

    def __call__(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self.last < self.interval:
            return
        self.last = now
        update_progress_artifact(self.id, progress=round(100.0 * min(max(fraction, 0.0), 1.0), 1),
                                 description=message or None)


MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def picture_markdown(title: str, picture: str | Path, text: str = "") -> str:
    """Markdown with ``picture`` (PNG or JPEG) embedded as a ``data:`` URI under a ``### title`` heading,
    then where the file is and ``text``."""
    picture = Path(picture)
    data = base64.b64encode(picture.read_bytes()).decode("ascii")
    return (f"### {title}\n\n![{title}](data:{MIME[picture.suffix.lower()]};base64,{data})\n\n"
            f"`{picture.name}` in `{picture.parent}`\n\n{text}")


def publish_picture(key: str, title: str, picture: str | Path, description: str, text: str = "") -> None:
    create_markdown_artifact(key=key, markdown=picture_markdown(title, picture, text), description=description)


def _table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows])


def publish_training(run_ids: list[str], summaries: dict[str, dict], out_dir: str | Path,
                     db_path=None) -> Path | None:
    """``loss.png`` (loss and lr per step of each stage, from the warehouse) and a summary table per stage;
    only the table when the runs logged no step (a stage resumed at its end). The picture's path, or None."""
    from mgllava import plots
    from warehouse.training import logged_steps

    keys = ("steps", "final_loss", "records", "images_without_boxes", "export_dir")
    table = _table(["stage", *keys], [[stage] + [s.get(k) for k in keys] for stage, s in summaries.items()])
    steps = logged_steps(run_ids, db_path=db_path)
    if not steps:
        create_markdown_artifact(key="loss-curves", markdown="### Training\n\nNo step logged in this run.\n\n" + table,
                                 description="Loss and lr per optimizer step")
        return None
    png = plots.loss_curves(steps, Path(out_dir) / "loss.png")
    publish_picture("loss-curves", "Training loss and learning rate", png, "Loss and lr per optimizer step", table)
    return png


def publish_scores(scores: list[dict], out_dir: str | Path) -> Path | None:
    """``scores.png`` (each benchmark's headline score against chance) and the score table; None without scores."""
    from mgllava import plots

    rows = [[r.get("task"), r.get("metric"), None if r.get("value") is None else f"{r['value']:.4f}", r.get("n"),
             r.get("status")] for r in scores]
    table = _table(["task", "metric", "value", "n", "status"], rows)
    if not any(r.get("value") is not None for r in scores):
        create_markdown_artifact(key="scores", markdown="### Scores\n\n" + table, description="Benchmarks")
        return None
    png = plots.score_chart(scores, Path(out_dir) / "scores.png", title="Benchmarks (red: chance)")
    publish_picture("scores", "Scores against chance", png, "Benchmarks", table)
    return png


def gallery_samples(box_dir: str | Path, n: int = 8) -> list[tuple]:
    """``(image, detections, key)`` of the first ``n`` images of a box table that have boxes (images without
    any fill the rest: a detector that finds nothing shows as such)."""
    import pyarrow.parquet as pq
    from PIL import Image

    from detector.tables import BoxTable

    table = BoxTable.open(box_dir)
    with_boxes, without = [], []
    for row in pq.read_table(Path(box_dir) / "plan.parquet", columns=["image_key", "path"]).to_pylist():
        detections = table.get(row["image_key"])
        if detections is not None:
            (with_boxes if detections else without).append((row["path"], detections, row["image_key"]))
        if len(with_boxes) == n:
            break
    samples = []
    for path, detections, key in (with_boxes + without)[:n]:
        with Image.open(path) as image:
            samples.append((image.convert("RGB"), detections, key))
    return samples


def publish_boxes(box_dir: str | Path, manifest: dict) -> Path | None:
    """``gallery.png`` in the box table (sample images with their boxes) and the table's totals."""
    from mgllava import plots

    totals = manifest.get("totals", {})
    text = (f"Box table `{box_dir}`\n\n"
            + _table(["images", "rows", "boxes", "rejects"],
                     [[totals.get("images"), totals.get("rows"), totals.get("boxes"), totals.get("rejects")]]))
    samples = gallery_samples(box_dir)
    if not samples:
        create_markdown_artifact(key="box-table", markdown="### Box table\n\n" + text, description="Detection")
        return None
    png = plots.detection_gallery(samples, Path(box_dir) / "gallery.png")
    publish_picture("box-table", "Detections (sample images)", png, "Detection", text)
    return png


def publish_detector_training(metrics: dict) -> None:
    """Ultralytics' own training plots (``results.png``, PR curve, confusion matrix...) and the held-out mAP."""
    keys = ("map50", "map50_95", "precision", "recall", "split", "epochs", "train_seconds")
    text = _table(list(keys), [[metrics.get(k) for k in keys]])
    for path in map(Path, metrics.get("plots", [])):
        key = "detector-" + path.stem.lower().replace("_", "-")
        publish_picture(key, f"Detector training: {path.name}", path, "Ultralytics training plot", text)
