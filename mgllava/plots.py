"""The pictures of a run, as PNG files: loss curves, scores against chance, boxes drawn on images.

- :func:`loss_curves`: one panel per training stage, the loss per optimizer step and the
  learning rate on a second axis (rows of the warehouse's ``train_steps``).
- :func:`score_chart`: each benchmark's headline metric as a bar, on a 0-1 scale, with the
  score of guessing marked where it is known (:data:`CHANCE`).
- :func:`score_history`: the headline metrics of every evaluation over time (``mgllava results --plot``).
- :func:`draw_boxes` / :func:`detection_gallery`: detections drawn with Ultralytics' own
  :class:`~ultralytics.utils.plotting.Annotator` (its OpenCV mode: no font download), one image
  or a grid of a box table's images.

Figures use matplotlib's object API (no pyplot, no global backend). Each function writes its
PNG and returns the path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

HEADLINE_METRICS = ("pope_accuracy", "gpt_eval_score", "exact_match", "accuracy", "acc", "mme_perception_score")
"""A benchmark's metric to chart, in order of preference (else its first metric by name)."""

PERCENT_METRICS = {"gpt_eval_score": 100.0}
"""Metrics reported in percent (MMBench's): divided by this to chart them on 0-1."""

CHANCE = {"pope": 0.5, "mmbench": 0.25, "seedbench": 0.25, "ai2d": 0.25, "mmvp": 0.5}
"""The headline score of answering at random, for the benchmarks with fixed answer options."""


def headline_metric(metrics: Iterable[str]) -> str:
    """The metric charted for a benchmark with ``metrics``."""
    metrics = sorted(metrics)
    return next((m for m in HEADLINE_METRICS if m in metrics), metrics[0])


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def loss_curves(steps: Iterable[tuple[str, int, float, float]], out: str | Path) -> Path:
    """``steps``: ``(stage, step, loss, lr)`` rows. One panel per stage (pretrain first)."""
    by_stage: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for stage, step, loss, lr in steps:
        by_stage[stage].append((step, loss, lr))
    if not by_stage:
        raise ValueError("no training steps to plot")
    order = sorted(by_stage, key=lambda s: ({"pretrain": 0, "finetune": 1}.get(s, 2), s))
    fig = _figure(5.0 * len(order), 3.6)
    for ax, stage in zip(fig.subplots(1, len(order), squeeze=False)[0], order):
        step, loss, lr = (list(v) for v in zip(*sorted(by_stage[stage])))
        ax.plot(step, loss, color="tab:blue", marker="." if len(step) < 50 else None)
        ax.set(title=f"{stage}: {len(step)} steps, final loss {loss[-1]:.3f}", xlabel="optimizer step")
        ax.set_ylabel("loss", color="tab:blue")
        ax.grid(alpha=0.3)
        lr_ax = ax.twinx()
        lr_ax.plot(step, lr, color="tab:orange", linestyle="--")
        lr_ax.set_ylabel("learning rate", color="tab:orange")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    return _save(fig, out)


def _headlines(scores: Iterable[dict]) -> dict[str, tuple[str, float]]:
    """``{benchmark: (metric, value on 0-1)}`` from score rows (``task``, ``metric``, ``value``)."""
    by_task: dict[str, dict[str, float]] = defaultdict(dict)
    for row in scores:
        if row.get("metric") and row.get("value") is not None:
            by_task[row["task"]][row["metric"]] = float(row["value"])
    heads = {}
    for task, metrics in by_task.items():
        metric = headline_metric(metrics)
        heads[task] = (metric, metrics[metric] / PERCENT_METRICS.get(metric, 1.0))
    return heads


def score_chart(scores: Iterable[dict], out: str | Path, title: str = "Scores") -> Path:
    """A bar per benchmark (its headline metric, 0-1) with a red mark at chance where known."""
    heads = _headlines(scores)
    if not heads:
        raise ValueError("no scores to plot")
    tasks = sorted(heads)
    fig = _figure(6.5, 1.0 + 0.55 * len(tasks))
    ax = fig.subplots()
    values = [heads[t][1] for t in tasks]
    ax.barh(range(len(tasks)), values, color="tab:blue", height=0.6)
    for i, task in enumerate(tasks):
        ax.text(min(values[i], 0.98) + 0.01, i, f"{values[i]:.3f}", va="center", fontsize=9)
        if task in CHANCE:
            ax.plot([CHANCE[task]] * 2, [i - 0.4, i + 0.4], color="tab:red", linewidth=2.5)
    ax.set_yticks(range(len(tasks)), [f"{t}\n({heads[t][0]})" for t in tasks], fontsize=8)
    ax.set(xlim=(0, 1.1), xlabel="score (red: chance)", title=title)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out)


def score_history(rows: Iterable[tuple], out: str | Path) -> Path:
    """``rows``: ``(evaluated_at, task, metric, value)``. One line per benchmark's headline metric, over time."""
    by_task: dict[str, dict[str, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for at, task, metric, value in rows:
        if value is not None:
            by_task[task][metric].append((at, float(value)))
    if not by_task:
        raise ValueError("no scores to plot")
    fig = _figure(7.5, 4.0)
    ax = fig.subplots()
    for task in sorted(by_task):
        metric = headline_metric(by_task[task])
        points = sorted(by_task[task][metric])
        scale = PERCENT_METRICS.get(metric, 1.0)
        line, = ax.plot([p[0] for p in points], [p[1] / scale for p in points], marker="o", label=f"{task} ({metric})")
        if task in CHANCE:
            ax.axhline(CHANCE[task], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(ylim=(0, 1.05), ylabel="score (dotted: chance)", title="Scores over time")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _save(fig, out)


def draw_boxes(image: Image.Image, detections: Sequence[tuple]) -> np.ndarray:
    """``image`` (RGB) with ``detections`` (``x1, y1, x2, y2, score, label``) drawn by Ultralytics'
    Annotator; an RGB array. Each label keeps one colour (Ultralytics' palette)."""
    from ultralytics.utils.plotting import Annotator, colors

    annotator = Annotator(np.ascontiguousarray(np.asarray(image.convert("RGB"))), pil=False)
    labels = sorted({d[5] for d in detections})
    for x1, y1, x2, y2, score, label in detections:
        annotator.box_label([x1, y1, x2, y2], f"{label} {score:.2f}", color=colors(labels.index(label)))
    return annotator.result()


def boxed_image(image: Image.Image, detections: Sequence[tuple], out: str | Path) -> Path:
    """:func:`draw_boxes` saved as a PNG (``mgllava chat --save``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_boxes(image, detections)).save(out, format="PNG")
    return out


def detection_gallery(samples: Sequence[tuple[Image.Image, Sequence[tuple], str]], out: str | Path,
                      tile: int = 256, columns: int = 4) -> Path:
    """A grid of ``(image, detections, caption)`` samples, boxes drawn, each fitted into a ``tile`` square."""
    if not samples:
        raise ValueError("no images to draw")
    columns = min(columns, len(samples))
    rows = math.ceil(len(samples) / columns)
    caption_h = 18
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption_h)), (255, 255, 255))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(sheet)
    for i, (image, detections, caption) in enumerate(samples):
        drawn = Image.fromarray(draw_boxes(image, detections))
        drawn.thumbnail((tile - 4, tile - 4))
        x, y = (i % columns) * tile, (i // columns) * (tile + caption_h)
        sheet.paste(drawn, (x + (tile - drawn.width) // 2, y + 2))
        draw.text((x + 4, y + tile + 2), f"{caption} ({len(detections)} boxes)"[:40], fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out
