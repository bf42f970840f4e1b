"""Benchmark evaluation: batched vs batch-size-1 on the same task and model.

Runs one local lmms-eval task (``mgllava.eval.runner.run_benchmark``, the path the flow
``evaluate`` takes) with ``--batch-size`` and with batch size 1, and prints for each:
samples/s over the whole task (lmms-eval's request building, images, box lookup, the
processor's inputs, generation, decoding, scoring), samples/s of the model's ``generate`` calls
alone (``MGLLaVALmms.stats["generate_s"]``), and the share of time spent outside them; then the
batched/unbatched ratio (target: at least 4x, with at most 15% of the batched time outside
``generate``), and last one JSON line with the figures. A warm-up pass first loads the model and
fills the detector cache, so both timed runs see the same state.

Model: ``--model`` (an export directory) on the shapes world ``--world``; without them a tiny
world, zoo (random towers) and *untrained* export are generated into a temporary directory, or
into ``--work DIR``, where the next run finds and reuses them (the speed of generation does not depend on the weights' values, only on answer lengths, and
``--max-new-tokens`` fixes those for an untrained model, which never stops early).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

for _name, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                      "YOLO_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported MG-LLaVA directory (default: an untrained tiny export)")
    p.add_argument("--world", help="shapes world directory holding bench/<task> (required with --model)")
    p.add_argument("--task", default="pope", choices=("pope", "mmbench", "textvqa", "gqa"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="samples (default: the whole set)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--detector", default="yolo11n.yaml", help="detector for the boxes (weights or model YAML)")
    p.add_argument("--images", type=int, default=60, help="world size when generating one (default 60)")
    p.add_argument("--work", help="directory for the generated world, zoo and export, kept and reused by the "
                                  "next run (default: a temporary one)")
    return p.parse_args(argv)


def build_default(work: Path, n_images: int) -> tuple[Path, Path]:
    """``(export, world)`` under ``work``, each built unless an earlier run left it there."""
    from mgllava.config import ZooConfig, load_config
    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor
    from mgllava.model.configuration_mgllava import EXPORT_CONFIG
    from mgllava.shapes.world import generate_world
    from mgllava.shapes.zoo import build_zoo

    world, zoo, export = work / "world", work / "zoo", work / "export"
    if not (export / EXPORT_CONFIG).is_file():
        print(f"building a tiny world ({n_images} images), zoo and untrained export in {work} ...", flush=True)
        world = generate_world(world, n_images=n_images, seed=0, progress=False)
        tiny = load_config(preset="tiny").model
        zoo = build_zoo(zoo, world, high_res=tiny.vision.high_res, low_res=tiny.vision.low_res,
                        max_length=tiny.max_length, recipe=ZooConfig(tower_scenes=0))  # random towers: same speed
        model = tiny.model_copy(deep=True)
        model.llm.path, model.vision.clip_path, model.vision.convnext_path = (
            str(zoo / "llm"), str(zoo / "clip"), str(zoo / "convnext"))
        MGLLaVAForConditionalGeneration.from_config(model).export(export, MGLLaVAProcessor.from_config(model))
    return export, world


def main(argv=None) -> int:
    args = parse_args(argv)
    from detector.model import DetectorSettings
    from mgllava.eval.runner import run_benchmark
    from mgllava.eval.tasks import BENCHMARKS, TaskPlan, write_task_files

    with tempfile.TemporaryDirectory(prefix="mgllava-bench-eval-") as tmp_name:
        tmp = Path(tmp_name)
        if args.model:
            if not args.world:
                sys.exit("--world is required with --model")
            model_dir, world = Path(args.model), Path(args.world)
        else:
            model_dir, world = build_default(Path(args.work) if args.work else tmp, args.images)
        bench = BENCHMARKS[args.task]
        plan = TaskPlan(bench.name, bench.task, "ready", data_dir=str(world / "bench" / bench.name))
        include = write_task_files([plan], tmp / "tasks")
        kwargs = {"pretrained": str(model_dir), "detection_cache": str(tmp / "detections"),
                  "detector": DetectorSettings(model=args.detector, device="cpu")}

        def run(batch_size: int, max_new_tokens: int):
            result = run_benchmark(plan, include, {**kwargs, "batch_size": batch_size,
                                                   "max_new_tokens": max_new_tokens}, args.limit, tmp / "out")
            if result.status != "completed":
                sys.exit(f"{args.task} failed: {result.reason}")
            return result

        run(args.batch_size, 1)  # warm-up: imports, model load, detector cache
        rows = []
        for batch_size in (1, args.batch_size):
            r = run(batch_size, args.max_new_tokens)
            rows.append((batch_size, r.n, r.seconds, r.n / r.seconds, r.n / r.generate_seconds,
                         1 - r.generate_seconds / r.seconds))
    print(f"\ntask {args.task}, model {model_dir if args.model else 'tiny (untrained)'}, "
          f"max_new_tokens {args.max_new_tokens}, {os.cpu_count()} CPUs")
    print(f"{'batch':>5}  {'samples':>7}  {'seconds':>7}  {'samples/s':>9}  {'generate samples/s':>18}  "
          f"{'outside generate':>16}")
    for batch_size, n, seconds, sps, gen_sps, outside in rows:
        print(f"{batch_size:>5}  {n:>7}  {seconds:>7.1f}  {sps:>9.2f}  {gen_sps:>18.2f}  {outside:>15.0%}")
    ratio = rows[1][3] / rows[0][3]
    print(f"batched / batch-size-1 samples/s: {ratio:.2f}x (target >= 4x, <= 15% outside generate)")
    print(json.dumps({
        "benchmark": "eval", "task": args.task, "max_new_tokens": args.max_new_tokens, "cpus": os.cpu_count(),
        "runs": [{"batch": b, "samples": n, "seconds": round(sec, 3), "samples_per_s": round(sps, 3),
                  "generate_samples_per_s": round(gen, 3), "outside_generate": round(out, 3)}
                 for b, n, sec, sps, gen, out in rows],
        "batched_over_bs1": round(ratio, 3), "target_batched_over_bs1": 4.0,
        "batched_outside_generate": round(rows[1][5], 3), "target_batched_outside_generate": 0.15,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
