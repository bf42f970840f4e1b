"""``mgllava detect``, ``mgllava detect import`` and ``mgllava detector-train`` (light at import: no
torch/ultralytics here)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def register_cli(subparsers) -> None:
    from mgllava.cli import add_config_args, comma_list, existing_path

    p = subparsers.add_parser(
        "detect",
        help="run the offline detector over a corpus, image folder or benchmark set into Parquet box tables",
        description="Detect boxes on every distinct image of the sources (LLaVA JSON + image root, an image "
        "folder, or a datasets save_to_disk benchmark set) and write sharded Parquet box tables "
        "(schema: detector/SCHEMA.md) plus a rejects table and manifest.json to --out. Resumable: an "
        "interrupted run redoes only unfinished shards; a finished run with the same inputs and detector "
        "is skipped. Defaults come from the configuration (data.*, detector.*).",
    )
    p.add_argument("--source", action="append", metavar="PATH", type=existing_path,
                   help="LLaVA .json/.jsonl, image folder, or benchmark dir (repeatable; default: the config's "
                   "data.pretrain_json and data.finetune_json, plus the image folder <data.image_root>/bench "
                   "when it exists: the shapes world's benchmark images)")
    p.add_argument("--image-root", metavar="DIR",
                   help="root that image keys are relative to (default: data.image_root when --source is not "
                   "given, else the JSON's folder / the image folder); benchmark images are materialised here")
    p.add_argument("--model", metavar="WEIGHTS_OR_YAML",
                   help="Ultralytics weights (.pt) or model YAML (random weights) (default: detector.model)")
    p.add_argument("--out", metavar="DIR", help="box table directory (default: data.boxes_dir)")
    p.add_argument("--classes", metavar="A,B", type=comma_list(),
                   help="comma-separated class names: prompts for YOLO-World/YOLOE, a filter for closed-set models")
    p.add_argument("--class-embeddings", metavar="FILE", type=existing_path,
                   help="precomputed prompt embeddings (.npz from YOLOE.save_prompt_embeddings, or .pt/.npy "
                   "of shape (n_classes, dim))")
    p.add_argument("--conf", type=float, help="score threshold (default: detector.conf)")
    p.add_argument("--iou", type=float, help="NMS IoU (default: detector.iou)")
    p.add_argument("--imgsz", type=int, help="inference size (default: detector.imgsz)")
    p.add_argument("--batch", type=int, help="images per forward pass (default: detector.batch)")
    p.add_argument("--device", help="auto, cpu or a CUDA device such as 0 (default: detector.device)")
    p.add_argument("--loader-threads", type=int,
                   help="threads decoding images ahead of the detector (default: detector.loader_threads)")
    p.add_argument("--shard-size", type=int, help="images per Parquet shard (default: detector.shard_size)")
    p.add_argument("--fresh", action="store_true", help="replace a box table of another run in --out")
    p.add_argument("--dask-address", metavar="ADDR",
                   help="run the shards on this Dask scheduler (tcp://host:port) through the Prefect flow 'detect'")
    p.add_argument("--warehouse", metavar="FILE",
                   help="DuckDB warehouse to record the run in and point the boxes views at "
                   "(default: $MGLLAVA_HOME/warehouse.duckdb)")
    p.add_argument("--no-warehouse", action="store_true", help="do not touch the DuckDB warehouse")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=_run_detect, on_dask=None)  # on_dask: the top floor's runner (mgllava.cli)
    _register_import(p.add_subparsers(dest="detect_command", metavar="import", required=False))

    t = subparsers.add_parser(
        "detector-train",
        help="train or fine-tune a YOLO detector on a YOLO-format dataset and check its mAP50",
        description="Train (from a model YAML) or fine-tune (from .pt weights) an Ultralytics YOLO on a "
        "YOLO-format dataset; keep <out>/weights/best.pt, measure its mAP50 on the held-out split and "
        "record it in <out>/weights/metrics.json. Exits 3 if mAP50 is below min_map50. Defaults come "
        "from the configuration (detector.train.*).",
    )
    t.add_argument("--data", metavar="DATA_YAML", type=existing_path,
                   help="Ultralytics dataset YAML (default: detector.train.data)")
    t.add_argument("--base", metavar="YAML_OR_PT", help="model YAML or weights to start from (default: "
                   "detector.train.base)")
    t.add_argument("--epochs", type=int, help="default: detector.train.epochs")
    t.add_argument("--imgsz", type=int, help="default: detector.train.imgsz")
    t.add_argument("--batch", type=int, help="default: detector.train.batch")
    t.add_argument("--min-map50", type=float, help="default: detector.train.min_map50")
    t.add_argument("--device", help="auto, cpu or a CUDA device (default: detector.device)")
    t.add_argument("--out", metavar="DIR", help="output directory; weights in DIR/weights (default: the "
                   "folder two levels above detector.model, i.e. <work_dir>/detector)")
    add_config_args(t)
    t.set_defaults(func=_run_train)


def _register_import(subparsers) -> None:
    from mgllava.cli import add_config_args, existing_path

    p = subparsers.add_parser(
        "import",
        help="import a published MG-LLaVA box file as a box table (instead of detecting)",
        description="Join the entries of a reference MG-LLaVA box file (a JSON list of {id, boxes, scores, labels} "
        "in original-image pixels, keyed by the sample id of a LLaVA JSON) to the corpus' images and write a box "
        "table (detector/SCHEMA.md) that training and evaluation read like a detected one. Unknown ids, records "
        "without an entry and malformed entries are counted and listed; the totals reconcile. Uses the "
        "configuration's detector.max_image_pixels and data.allow_absolute_image_paths.",
    )
    p.add_argument("--boxes", required=True, metavar="FILE.json", type=existing_path, help="the reference box file")
    p.add_argument("--corpus", required=True, metavar="DATA.json", type=existing_path,
                   help="the LLaVA JSON/JSONL its ids refer to")
    p.add_argument("--image-root", required=True, metavar="DIR", type=existing_path,
                   help="root that the corpus' image paths are under")
    p.add_argument("--out", required=True, metavar="DIR", help="box table directory to write")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per Parquet shard (default: 10000)")
    p.add_argument("--fresh", action="store_true", help="replace another box table in --out")
    p.add_argument("--warehouse", metavar="FILE", help="DuckDB warehouse to record the table in "
                   "(default: $MGLLAVA_HOME/warehouse.duckdb)")
    p.add_argument("--no-warehouse", action="store_true", help="do not touch the DuckDB warehouse")
    add_config_args(p)
    p.set_defaults(func=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    from detector.box_import import BoxImportError, import_boxes
    from detector.errors import RunConflictError
    from mgllava.cli import config_from_args

    config = config_from_args(args)
    try:
        result = import_boxes(args.boxes, args.corpus, args.image_root, args.out,
                              max_image_pixels=config.detector.max_image_pixels,
                              allow_absolute=config.data.allow_absolute_image_paths,
                              shard_size=args.shard_size, overwrite=args.fresh)
    except (BoxImportError, RunConflictError, FileNotFoundError) as exc:
        print(f"mgllava detect import: error: {exc}", file=sys.stderr)
        return 2
    if not args.no_warehouse:
        _record_in_warehouse(args.warehouse, result.out)
    print(result.summary())
    return 0


def _run_detect(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from detector.inputs import default_sources
    from mgllava.cli import UsageError, config_from_args

    config = config_from_args(args)
    det = config.detector
    image_root = args.image_root or (None if args.source else config.data.image_root)
    sources = args.source or default_sources(config)
    out = args.out or config.data.boxes_dir
    shard_size = args.shard_size or det.shard_size

    from detector.errors import DetectorError, RunConflictError
    from detector.model import DetectorSettings, check_model

    settings = DetectorSettings.from_config(
        det, model=args.model, classes=args.classes, class_embeddings=args.class_embeddings, conf=args.conf,
        iou=args.iou, imgsz=args.imgsz, batch=args.batch, device=args.device, loader_threads=args.loader_threads,
        allow_absolute_image_paths=config.data.allow_absolute_image_paths,
    )
    try:
        check_model(settings.model)  # before reading the sources
    except DetectorError as exc:
        raise UsageError("--model", str(exc)) from None
    try:
        if args.dask_address:
            if args.on_dask is None:
                raise UsageError("--dask-address", "Dask runs go through the `mgllava` command (mgllava.cli)")
            result = args.on_dask(sources, out, settings, image_root, shard_size, args.fresh, args.dask_address)
        else:
            result = _detect_with_bar(sources, out, settings, image_root, shard_size, args)
    except (DetectorError, RunConflictError, FileNotFoundError, ValueError) as exc:
        print(f"mgllava detect: error: {exc}", file=sys.stderr)
        return 2
    if not args.no_warehouse:
        _record_in_warehouse(args.warehouse, result.out)
    print(result.summary())
    return 0


def _detect_with_bar(sources, out, settings, image_root, shard_size, args):
    from tqdm import tqdm

    from detector.pipeline import run_detection

    bar = tqdm(total=0, unit="img", desc="detect", disable=args.quiet, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    try:
        return run_detection(sources, out, settings, image_root=image_root, shard_size=shard_size,
                             overwrite=args.fresh, progress=progress)
    finally:
        bar.close()


def _record_in_warehouse(path, out) -> None:
    try:
        from warehouse.db import register_box_table

        register_box_table(out, path)
    except Exception as exc:  # the box table is written; the warehouse is a convenience
        log.warning("could not record the run in the DuckDB warehouse: %s", exc)


def _run_train(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from mgllava.cli import UsageError, config_from_args

    config = config_from_args(args)
    tc = config.detector.train
    if not (args.data or tc.data):
        raise UsageError("--data", "no YOLO dataset YAML: give --data FILE or set detector.train.data")
    out = args.out or str(Path(config.detector.model).parent.parent)
    from detector.errors import DetectorError, DetectorQualityError
    from detector.train import METRICS_FILE, train_detector

    try:
        metrics = train_detector(
            data=args.data or tc.data, out=out, base=args.base or tc.base, epochs=args.epochs or tc.epochs,
            imgsz=args.imgsz or tc.imgsz, batch=args.batch or tc.batch,
            min_map50=tc.min_map50 if args.min_map50 is None else args.min_map50,
            device=args.device or config.detector.device,
        )
    except DetectorQualityError as exc:
        print(json.dumps({k: exc.metrics[k] for k in ("map50", "min_map50", "passed", "weights")}))
        print(f"mgllava detector-train: FAILED: {exc}", file=sys.stderr)
        return 3
    except DetectorError as exc:
        print(f"mgllava detector-train: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: metrics[k] for k in ("map50", "min_map50", "passed", "weights")}))
    print(f"detector-train: mAP50 {metrics['map50']:.3f} on '{metrics['split']}' (>= {metrics['min_map50']:.2f}) "
          f"in {metrics['train_seconds']:.0f} s -> {metrics['weights']} ({Path(metrics['weights']).parent / METRICS_FILE})")
    return 0
