"""Finetune steps with each batch's length rounded up to a multiple (``data.pad_to_multiple_of``) vs not.

On a CPU under bf16 autocast every new batch length costs new matrix-product kernels and their memory,
so a training process whose batches take many lengths slows down as it ages; rounding the lengths up
leaves few (docs/results.md, session 15). This runs the tiny preset's finetune stage (``run_stage``:
DeepSpeed ZeRO-2, the preset's precision, micro-batch and global batch, the frozen towers' features
cached) for ``--steps`` optimizer steps on the preset's world (its ground-truth boxes; the towers and
the LLM untrained, which changes no step's cost), once with ``--multiple`` 1 (each batch as long as
its longest row) and once with the multiple, each in a fresh process. Reported for each: seconds per
step by quarter of the run (from the logged samples/s), the wall time, peak resident memory; then the
ratios unrounded / rounded for the last quarter's steps and the wall time. The last line is one JSON
object with the figures.

    python benchmarks/batch_padding.py [--steps 280] [--multiple 32] [--images 400] [--work DIR]

``--work DIR`` keeps the world and zoo there for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=280, help="optimizer steps in each run (the demo: 1,120)")
    parser.add_argument("--multiple", type=int, default=32, help="the rounded run's multiple")
    parser.add_argument("--images", type=int, default=400, help="images in the world (the preset's: 400)")
    parser.add_argument("--work", help="directory for the world and zoo (default: a temporary one)")
    parser.add_argument("--one-run", type=int, metavar="MULTIPLE", help=argparse.SUPPRESS)  # a child process
    return parser.parse_args(argv)


def one_run(work: Path, steps: int, multiple: int) -> dict:
    """One finetune stage of ``steps`` steps with batch lengths rounded up to ``multiple``, in this process."""
    import torch

    from mgllava.config import load_config
    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor
    from mgllava.model.boxes import Boxes
    from mgllava.shapes.world.generate import load_annotations
    from mgllava.train.data import Collate, ConversationDataset, cache_image_features, load_conversations
    from mgllava.train.engine import run_stage

    config = load_config(overrides=[f"work_dir={work}"])
    stage = config.train.finetune.model_copy(update={"epochs": 1, "save_every": 10**6})
    records, _ = load_conversations(config.data.finetune_json)
    records = records[: steps * stage.global_batch]
    boxes = {a["image"]: Boxes(xyxy=[o["box"] for o in a["objects"]] or [[0, 0, 1, 1]])
             for a in load_annotations(work / "world")}
    torch.manual_seed(0)
    model = MGLLaVAForConditionalGeneration.from_config(config.model)
    model.set_stage("finetune")
    processor = MGLLaVAProcessor.from_config(config.model)
    dataset = ConversationDataset(records, config.data.image_root, boxes, processor)
    cache_image_features(dataset, model.encode_frozen, progress=False)
    started = time.perf_counter()
    result = run_stage(model, dataset, Collate(processor, pad_to_multiple_of=multiple), stage, "finetune",
                       work / f"checkpoints-{multiple}", seed=0, progress=False)
    wall = time.perf_counter() - started
    seconds = [stage.global_batch / metrics.samples_per_s for metrics in result.metrics]  # one per step
    quarter = max(1, len(seconds) // 4)
    quarters = [seconds[1:quarter] or seconds[:1], seconds[quarter : 2 * quarter], seconds[2 * quarter : 3 * quarter],
                seconds[3 * quarter :]]
    return {"multiple": multiple, "steps": len(seconds), "wall_s": round(wall, 1),
            "s_per_step_by_quarter": [round(sum(q) / len(q), 4) if q else None for q in quarters],
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "final_loss": result.metrics[-1].loss}


def prepare(work: Path, n_images: int) -> None:
    """The preset's world (``n_images`` images) and a zoo without its training (random towers, an LLM
    that has only had its text pretraining), under ``work``."""
    from mgllava.config import load_config
    from mgllava.shapes.world.generate import generate_world
    from mgllava.shapes.zoo import build_zoo

    config = load_config(overrides=[f"work_dir={work}"])
    world = config.shapes.world
    if not (work / "world" / "instruct.json").is_file():
        generate_world(work / "world", n_images, world.seed, False, world.conversations_per_image)
    recipe = config.shapes.zoo.model_copy(update={"llm_instruct_steps": 0, "tower_epochs": 0})
    vision = config.model.vision
    build_zoo(work / "zoo", work / "world", vision.high_res, vision.low_res, config.model.max_length, recipe)


def main(argv=None) -> int:
    from mgllava import child_environment

    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="batch_padding_"))
    if args.one_run is not None:
        print(json.dumps(one_run(work, args.steps, args.one_run)))
        return 0
    prepare(work, args.images)
    runs = []
    for multiple in (1, args.multiple):  # each in a fresh process: the slowdown is the process's
        command = [sys.executable, __file__, "--one-run", str(multiple), "--steps", str(args.steps), "--work", str(work)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=child_environment())
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"the run with multiple {multiple} failed (exit {done.returncode})")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        run = runs[-1]
        print(f"multiple {multiple}: {run['steps']} steps in {run['wall_s']} s; s per step by quarter "
              f"{run['s_per_step_by_quarter']}; peak RSS {run['peak_rss_gib']} GiB", flush=True)
    unrounded, rounded = runs
    summary = {
        "benchmark": "batch_padding", "steps": args.steps, "images": args.images, "runs": runs,
        "last_quarter_unrounded_over_rounded": round(unrounded["s_per_step_by_quarter"][-1]
                                                     / rounded["s_per_step_by_quarter"][-1], 3),
        "wall_unrounded_over_rounded": round(unrounded["wall_s"] / rounded["wall_s"], 3),
    }
    print(f"unrounded / rounded: last quarter's steps {summary['last_quarter_unrounded_over_rounded']}x, "
          f"wall {summary['wall_unrounded_over_rounded']}x")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
