"""Benchmark the detection stage: pipeline vs per-image predict loop vs pure batched forward.

On the same images and model it measures images/s of

1. **pipeline**: ``detector.pipeline.run_detection`` (read + hash + decode files, batched
   Ultralytics predict, NMS, Parquet shards, manifest), into a fresh directory;
2. **per-image loop**: ``model.predict(path)`` once per image (Ultralytics reads the file);
3. **pure forward**: the torch module on pre-loaded, pre-letterboxed batches (no I/O,
   no pre/post-processing), in ``torch.inference_mode``.

and prints pipeline/forward overhead (target: at most 10%; the two alternate, best of ``--repeat`` each) and pipeline/loop speed-up, then one
JSON line with the figures. Images: ``--images DIR``
(e.g. a shapes world's ``images/train``), else a shapes world generated into a temporary
directory (``mgllava.shapes.world``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="folder of images (default: generate a shapes world)")
    p.add_argument("--n", type=int, default=160, help="number of images (default 160)")
    p.add_argument("--model", default="yolo11n.yaml", help="weights or model YAML (default yolo11n.yaml)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--device", default="auto")
    p.add_argument("--loader-threads", type=int,
                   help="the pipeline's image-loading threads (default: 0 on a CPU, up to 8 on a GPU)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed repetitions per method, the pipeline and the forward alternating; best is kept")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    from PIL import Image
    from ultralytics.data.augment import LetterBox

    from detector.model import DetectorSettings, get_detector
    from detector.pipeline import loader_threads_for, run_detection

    tmp = Path(tempfile.mkdtemp(prefix="mgllava-bench-"))
    try:
        if args.images:
            folder = Path(args.images)
        else:
            from mgllava.shapes.world import generate_world

            world = generate_world(tmp / "world", n_images=max(10, int(args.n / 0.7) + 2), seed=0, progress=False)
            folder = world / "images" / "train"
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[: args.n]
        sub = tmp / "imgs"
        sub.mkdir()
        for p in paths:
            shutil.copy(p, sub / p.name)
        n = len(paths)
        settings = DetectorSettings(model=args.model, conf=args.conf, imgsz=args.imgsz, batch=args.batch,
                                    device=args.device, loader_threads=args.loader_threads)
        det = get_detector(settings)
        loader_threads = loader_threads_for(settings, det.device)
        print(f"{n} images from {folder}, model {det.name}, imgsz {args.imgsz}, batch {args.batch}, "
              f"device {det.device}, torch threads {torch.get_num_threads()}, loader threads {loader_threads}")
        det.predict([np.zeros((64, 64, 3), np.uint8)])  # warm-up (predictor setup, fusing)

        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        model = det.model

        def loop():
            for p in paths:
                model.predict(str(p), imgsz=args.imgsz, conf=args.conf, device=det.device, verbose=False)

        lb = LetterBox((args.imgsz, args.imgsz), auto=False, stride=32)
        arrays = [lb(image=np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))[:, :, ::-1])) for p in paths]
        dev = torch.device("cuda:0" if det.device not in ("cpu",) else "cpu")
        batches = []
        for s in range(0, n, args.batch):
            x = np.stack(arrays[s : s + args.batch])[..., ::-1].transpose(0, 3, 1, 2)
            batches.append(torch.from_numpy(np.ascontiguousarray(x)).to(dev).float() / 255.0)
        net = model.predictor.model if model.predictor is not None else model.model  # the fused module in use

        def forward():
            with torch.inference_mode():
                for x in batches:
                    net(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        forward()
        # the pipeline and the forward alternate, so that a busy spell of a shared machine falls on both;
        # the best time of each is kept (the per-image loop, slower and only compared to, runs apart)
        runs = iter(range(10**6))
        pipe_times, fwd_times = [], []
        for _ in range(args.repeat):
            pipe_times.append(timed(lambda: run_detection([sub], tmp / f"out{next(runs)}", settings, shard_size=64)))
            fwd_times.append(timed(forward))
        t_pipe, t_fwd = min(pipe_times), min(fwd_times)
        t_loop = min(timed(loop) for _ in range(args.repeat))

        ips = {k: n / v for k, v in (("pipeline", t_pipe), ("per-image loop", t_loop), ("pure forward", t_fwd))}
        for k, v in ips.items():
            print(f"{k:>15}: {v:8.1f} images/s")
        overhead = t_pipe / t_fwd - 1.0
        print(f"pipeline overhead over the pure forward: {100 * overhead:+.1f}% (target <= 10%)")
        print(f"pipeline speed-up over the per-image loop: x{t_loop / t_pipe:.2f} (target > 1)")
        print(json.dumps({
            "benchmark": "detect", "images": n, "model": det.name, "imgsz": args.imgsz, "batch": args.batch,
            "device": det.device, "threads": torch.get_num_threads(), "loader_threads": loader_threads,
            "images_per_s": {k.replace(" ", "_").replace("-", "_"): round(v, 2) for k, v in ips.items()},
            "pipeline_over_forward": round(t_pipe / t_fwd, 3), "target_pipeline_over_forward": 1.10,
            "loop_over_pipeline": round(t_loop / t_pipe, 3),
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
