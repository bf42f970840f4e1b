"""Train or fine-tune an Ultralytics YOLO on a YOLO-format dataset, and check its mAP50.

``train_detector`` writes ``<out>/weights/best.pt`` (and ``last.pt``), then
measures mAP50 of ``best.pt`` on the dataset's held-out split (``test`` when
``data.yaml`` names one, else ``val``) and records it in
``<out>/weights/metrics.json``. If mAP50 is below ``min_map50`` it raises
:class:`DetectorQualityError` (the weights and the JSON, with ``"passed":
false``, are kept for inspection).

Third-party files run no code: weights load through Ultralytics' safe loading
(:func:`detector.model.ultralytics_safe_load`); a dataset YAML with a
``download`` key (which Ultralytics would execute as Python or shell when an
image folder is missing) is refused before Ultralytics sees it; and the
dataset's label caches (``labels/train.cache``: pickles that Ultralytics loads
with ``allow_pickle=True``) are never loaded: the labels are scanned instead
and the cache rewritten.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from detector.errors import DetectorError, DetectorQualityError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PLOTS = ("results.png", "labels.jpg", "BoxPR_curve.png", "confusion_matrix_normalized.png", "train_batch0.jpg",
         "val_batch0_pred.jpg")
"""Ultralytics' own training plots (``plots=True``) in the run folder, in the order a report shows them."""


def _read_dataset_yaml(data: Path) -> dict:
    """The dataset YAML as a mapping; refused if it has a ``download`` key (code Ultralytics would run)."""
    if data.suffix.lower() not in (".yaml", ".yml"):
        raise DetectorError(f"dataset {data}: expected a YOLO dataset YAML (.yaml)")
    try:
        spec = yaml.safe_load(data.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DetectorError(f"cannot read dataset YAML {data}: {exc}") from exc
    if not isinstance(spec, dict):
        raise DetectorError(f"dataset YAML {data} is not a mapping of keys (train, val, names...)")
    if "download" in spec:
        raise DetectorError(
            f"dataset YAML {data} has a 'download' key, which Ultralytics runs as Python or shell code: refused; "
            "remove the key and give local image folders"
        )
    return spec


def _unpickled_label_cache(path) -> dict:
    """Stands in for Ultralytics' ``load_dataset_cache_file`` (which unpickles): loads nothing, so the
    dataset rescans its labels and rewrites the cache."""
    raise FileNotFoundError(f"{path}: label caches are pickles and are not loaded; scanning the labels instead")


def _no_pickled_label_caches() -> None:
    from ultralytics.data import dataset

    dataset.load_dataset_cache_file = _unpickled_label_cache


def _heldout_split(data: Path, spec: dict) -> str:
    if "val" not in spec and "test" not in spec:
        raise DetectorError(f"dataset YAML {data} names no 'val' or 'test' split to measure mAP50 on")
    return "test" if spec.get("test") else "val"


def _epoch_reporter(progress: Callable[[float, str], None] | None) -> Callable:
    """An Ultralytics ``on_fit_epoch_end`` callback: one log line per epoch (losses, mAP50), and ``progress``."""

    def report(trainer) -> None:
        epoch, metrics = trainer.epoch + 1, trainer.metrics or {}
        if epoch > trainer.epochs:  # Ultralytics calls it again after validating best.pt
            return
        losses = ", ".join(f"{name} {float(value):.3f}" for name, value in (trainer.tloss or {}).items())
        line = (f"detector epoch {epoch}/{trainer.epochs}: {losses}; "
                f"mAP50 {float(metrics.get('metrics/mAP50(B)', float('nan'))):.3f}")
        log.info(line)
        if progress:
            progress(epoch / trainer.epochs, line)

    return report


def train_detector(
    data: str | Path,
    out: str | Path,
    base: str = "yolo11n.yaml",
    epochs: int = 15,
    imgsz: int = 320,
    batch: int = 16,
    min_map50: float = 0.6,
    device: str = "auto",
    workers: int = 2,
    seed: int = 0,
    progress: Callable[[float, str], None] | None = None,
    **train_kwargs,
) -> dict:
    """Train ``base`` (a model YAML: from scratch; a ``.pt``: fine-tune) on ``data``; return the metrics.

    Each epoch logs its validation mAP50 and calls ``progress(fraction done, that line)``; Ultralytics'
    own plots (:data:`PLOTS`, among others) are written next to ``weights/``."""
    from ultralytics import YOLO

    from detector.model import (
        file_sha256,
        load_weights,
        torch_threads_kept,
        ultralytics_device,
        ultralytics_safe_load,
    )

    data = Path(data).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    if not data.is_file():
        raise DetectorError(f"dataset YAML not found: {data}")
    base_path = Path(base).expanduser()
    is_yaml = base_path.suffix.lower() in (".yaml", ".yml")
    if not is_yaml and not base_path.is_file():
        raise DetectorError(f"base weights not found: {base} (weights cannot be downloaded here)")
    split = _heldout_split(data, _read_dataset_yaml(data))
    device = ultralytics_device(device)
    if out.exists():  # a fresh run: Ultralytics would otherwise resume or mix old and new files
        for name in ("weights", "results.csv", "args.yaml"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    ultralytics_safe_load()
    _no_pickled_label_caches()
    with torch_threads_kept():
        t0 = time.perf_counter()
        model = YOLO(str(base_path) if base_path.exists() else base) if is_yaml else load_weights(base_path)
        kwargs = dict(
            data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, device=device, workers=workers,
            project=str(out.parent), name=out.name, exist_ok=True, plots=True, amp=False, seed=seed,
            deterministic=True, verbose=False, val=True,
        )
        kwargs.update(train_kwargs)
        model.add_callback("on_fit_epoch_end", _epoch_reporter(progress))
        model.train(**kwargs)
        train_seconds = time.perf_counter() - t0

        best = out / "weights" / "best.pt"
        if not best.is_file():
            raise DetectorError(f"training finished without writing {best}")
        metrics = load_weights(best).val(
            data=str(data), split=split, imgsz=imgsz, batch=batch, device=device, plots=False, verbose=False,
            workers=workers, project=str(out), name="val", exist_ok=True,
        )
    box = metrics.box
    result = {
        "map50": float(box.map50),
        "map50_95": float(box.map),
        "precision": float(box.mp),
        "recall": float(box.mr),
        "split": split,
        "min_map50": float(min_map50),
        "passed": bool(box.map50 >= min_map50),
        "weights": str(best),
        "weights_sha256": file_sha256(best),
        "data": str(data),
        "base": str(base),
        "epochs": int(epochs),
        "imgsz": int(imgsz),
        "batch": int(batch),
        "device": device,
        "train_seconds": round(train_seconds, 1),
        "plots": [str(out / name) for name in PLOTS if (out / name).is_file()],
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (best.parent / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    log.info("detector mAP50 on %s = %.3f (min %.2f) -> %s", split, result["map50"], min_map50, best)
    if not result["passed"]:
        raise DetectorQualityError(
            f"detector mAP50 {result['map50']:.3f} on the '{split}' split is below min_map50 {min_map50:.2f}: "
            f"train longer (--epochs), on more images, or lower detector.train.min_map50 "
            f"(weights kept at {best}, metrics in {best.parent / METRICS_FILE})",
            result,
        )
    return result
