"""Training-loop overhead: the full loop (data loading + DeepSpeed step) vs a plain torch loop.

Both train the same tiny MG-LLaVA (finetune stage: the LLM and the projectors) for the
same number of optimizer steps on the same micro-batches (the full loop's data order). The
plain loop runs forward, backward, gradient clipping (the engine clips too) and
``torch.optim.AdamW.step`` on batches built before the clock starts; the full loop is :func:`mgllava.train.engine.run_stage`: images decoded and preprocessed,
conversations tokenised and collated, a DeepSpeed ZeRO-2 engine. Prints seconds per
step for both and the overhead ratio (target: at most 10%). The two loops alternate for ``--rounds``
rounds and each keeps its best round, as ``detect.py`` does: on a noisy machine a loop timed once
and the other timed a minute later compare the machine's two minutes as much as the loops. A third run is the full loop
with ``data.cache_image_features`` (each image encoded once by the frozen encoders
before the first step): its seconds per step, the speed-up over the uncached full
loop, and what the one-off encoding cost. Both optimizers are the same AdamW (fused where the
device has the kernel, as the engine's). The last line of the output is one JSON object with the
figures. ``--breakdown`` splits the overhead: the full loop once more on samples loaded
before it starts (the engine's share: DeepSpeed, bookkeeping, collation), and the CPU
seconds that loading one batch costs on one thread (the data's share, which the loop
overlaps with the step on the same cores).

    python benchmarks/train_step.py [--steps 12] [--batch 8] [--rounds 3] [--work DIR] [--breakdown]

``--work DIR`` keeps the world and zoo there and reuses them on the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps timed in each loop")
    parser.add_argument("--batch", type=int, default=8, help="samples per step (one micro-batch)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two loops (best of each)")
    parser.add_argument("--work", help="directory for the world and zoo (default: a temporary one)")
    parser.add_argument("--breakdown", action="store_true", help="also time the engine alone and the data alone")
    args = parser.parse_args()

    import torch

    from mgllava.config import StageConfig, load_config
    from mgllava.model import MGLLaVAForConditionalGeneration, MGLLaVAProcessor
    from mgllava.shapes.world import generate_world
    from mgllava.shapes.zoo import build_zoo
    from mgllava.train.data import Collate, ConversationDataset, cache_image_features, load_conversations
    from mgllava.train.engine import fused_adamw_supported, run_stage
    from mgllava.train.schedule import micro_batch_order, plan_steps

    work = Path(args.work or tempfile.mkdtemp(prefix="train_step_"))
    world, zoo = work / "world", work / "zoo"
    if not (world / "instruct.json").is_file():
        world = generate_world(world, n_images=60, seed=0, progress=False)
    if not (zoo / "llm").is_dir():
        tiny = load_config().model
        zoo = build_zoo(zoo, world, tiny.vision.high_res, tiny.vision.low_res, tiny.max_length)
    config = load_config(overrides=[
        f"model.llm.path={zoo}/llm", f"model.vision.clip_path={zoo}/clip", f"model.vision.convnext_path={zoo}/convnext",
    ])
    records, _ = load_conversations(world / "instruct.json")
    n_samples = args.steps * args.batch
    records = (records * (n_samples // len(records) + 1))[:n_samples]

    def fresh_model():
        torch.manual_seed(0)
        model = MGLLaVAForConditionalGeneration.from_config(config.model)
        model.set_stage("finetune")
        return model

    model = fresh_model()
    processor = MGLLaVAProcessor.from_config(config.model)
    dataset = ConversationDataset(records, world / "images", {}, processor)
    collate = Collate(processor)

    stage = StageConfig(global_batch=args.batch, micro_batch=args.batch, lr=1e-4, epochs=1, save_every=10**6)
    order = micro_batch_order(len(dataset), plan_steps(stage, len(dataset), 1, "finetune"), seed=0, rank=0)

    # baseline: the full loop's micro-batches built beforehand, plain forward + backward + clipping + AdamW
    batches = [collate([dataset[i] for i in indices]) for indices in order]
    for batch in batches:
        batch.pop("skipped"), batch.pop("n_tokens")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=fused_adamw_supported(trainable))
    model.train()
    model(**batches[0], loss_only=True).loss.backward()  # warm-up
    optimizer.zero_grad()

    def plain_loop() -> float:
        started = time.perf_counter()
        for batch in batches:
            model(**batch, loss_only=True).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        return (time.perf_counter() - started) / args.steps

    # the full loop: DataLoader + processor + DeepSpeed ZeRO-2 (time per step from its own metrics,
    # so engine start-up and the checkpoint at the end are left out, as the warm-up is above)
    def full_loop(data) -> float:
        shutil.rmtree(work / "ckpt", ignore_errors=True)  # a checkpoint left by an earlier run would be resumed
        result = run_stage(fresh_model(), data, collate, stage, "finetune", work / "ckpt", seed=0, progress=False)
        steps = result.metrics[1:]  # the first step pays one-off costs in both loops' spirit
        return sum(args.batch / m.samples_per_s for m in steps) / len(steps)

    rounds = [(plain_loop(), full_loop(dataset)) for _ in range(args.rounds)]  # [(plain, full) s/step]
    plain, full = min(p for p, _ in rounds), min(f for _, f in rounds)
    cached_dataset = ConversationDataset(records, world / "images", {}, processor)
    started = time.perf_counter()
    cache_image_features(cached_dataset, fresh_model().encode_frozen, progress=False)
    caching = time.perf_counter() - started
    cached = full_loop(cached_dataset)

    print(f"plain torch loop (pre-built batches): {plain:.3f} s/step")
    print(f"full loop (data + DeepSpeed ZeRO-2):  {full:.3f} s/step")
    print(f"overhead of data pipeline + engine:    {100 * (full / plain - 1):+.1f}% (target <= 10%; best of "
          f"{args.rounds} alternating rounds, each round's ratio: {', '.join(f'{f / p:.3f}' for p, f in rounds)})")
    n_images = len(cached_dataset.image_features)
    print(f"full loop, cached image features:     {cached:.3f} s/step, {full / cached:.2f}x the uncached loop"
          f" (encoding {n_images} images once took {caching:.1f} s)")
    figures = {
        "benchmark": "train_step", "steps": args.steps, "batch": args.batch, "threads": torch.get_num_threads(),
        "plain_s_per_step": round(plain, 4), "full_s_per_step": round(full, 4),
        "full_over_plain": round(full / plain, 3), "target_full_over_plain": 1.10, "rounds": args.rounds,
        "round_full_over_plain": [round(f / p, 3) for p, f in rounds],
        "cached_s_per_step": round(cached, 4), "cached_speedup": round(full / cached, 3), "caching_s": round(caching, 2),
    }
    if args.breakdown:
        engine = full_loop([dataset[i] for i in range(len(dataset))])  # every sample loaded: collation is left
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as on the loop's prefetch thread
        started = time.process_time()
        for indices in order:
            collate([dataset[i] for i in indices])
        data = (time.process_time() - started) / len(order)
        torch.set_num_threads(threads)
        print(f"breakdown: the loop on loaded samples {engine:.3f} s/step ({100 * (engine / plain - 1):+.1f}%: "
              f"engine, bookkeeping, collation); loading a batch {data:.3f} CPU s on one thread "
              f"({100 * data / plain:.1f}% of a plain step)")
        figures.update(engine_s_per_step=round(engine, 4), engine_over_plain=round(engine / plain, 3),
                       data_cpu_s_per_batch=round(data, 4))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
