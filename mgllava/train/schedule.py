"""Step arithmetic and the DeepSpeed configuration of one training stage (SPEC section 6).

Kept free of torch and DeepSpeed imports, so a bad batch setting fails at start-up,
before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mgllava.config import ConfigError, StageConfig


@dataclass(frozen=True)
class StepPlan:
    world_size: int
    micro_batch: int  # samples per forward pass on one rank
    grad_accum: int  # micro-batches per optimizer step on one rank
    global_batch: int  # samples per optimizer step, all ranks
    total_steps: int  # optimizer steps in the stage
    warmup_steps: int

    @property
    def micro_batches_per_rank(self) -> int:
        return self.total_steps * self.grad_accum


def gradient_accumulation(stage: StageConfig, world_size: int, stage_name: str) -> int:
    """Micro-batches per optimizer step on one rank; fails, naming the fields, unless exact."""
    per_pass = stage.micro_batch * world_size
    if stage.global_batch % per_pass:
        raise ConfigError(
            f"train.{stage_name}.global_batch={stage.global_batch} is not divisible by "
            f"micro_batch x world_size = {stage.micro_batch} x {world_size} = {per_pass}"
        )
    return stage.global_batch // per_pass


def plan_steps(stage: StageConfig, n_samples: int, world_size: int, stage_name: str) -> StepPlan:
    """Gradient accumulation that reaches ``global_batch`` exactly, and the schedule's length.

    Fails with a message naming the fields when ``global_batch`` is not a multiple of
    ``micro_batch x world_size``, or when the data cannot fill one step.
    """
    grad_accum = gradient_accumulation(stage, world_size, stage_name)
    total = int(n_samples * stage.epochs) // stage.global_batch
    if stage.max_steps is not None:
        total = min(total, stage.max_steps)
    if total < 1:
        raise ConfigError(
            f"train.{stage_name}: {n_samples} samples x {stage.epochs} epochs do not fill one step "
            f"of global_batch={stage.global_batch}"
        )
    return StepPlan(
        world_size=world_size,
        micro_batch=stage.micro_batch,
        grad_accum=grad_accum,
        global_batch=stage.global_batch,
        total_steps=total,
        warmup_steps=max(1, math.ceil(stage.warmup_ratio * total)),
    )


def deepspeed_config(stage: StageConfig, plan: StepPlan, precision: str) -> dict:
    """The DeepSpeed config: ZeRO stage, batch split, clipping, precision, warm-up + cosine.

    ``precision`` is the resolved one (``fp32``, ``bf16`` or ``fp16``). The optimizer is a
    client ``torch.optim.AdamW`` (it runs on every accelerator, CPU included); the
    scheduler is DeepSpeed's ``WarmupCosineLR``: linear warm-up from ``lr x
    warmup_start_factor`` over ``warmup_steps``, then cosine to 0.
    """
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": stage.grad_clip,
        "zero_optimization": {"stage": stage.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": plan.total_steps,
                "warmup_num_steps": plan.warmup_steps,
                "warmup_min_ratio": stage.warmup_start_factor,
                "cos_min_ratio": 0.0,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def micro_batch_order(n_samples: int, plan: StepPlan, seed: int, rank: int) -> list[list[int]]:
    """Every micro-batch this rank will see, in order: the same for a seed, so a resumed run
    skips exactly the micro-batches it already trained on.

    Epoch ``e`` is a permutation of the samples seeded by ``seed + e``; epochs are chained
    and sliced into global batches; rank ``r`` takes every ``world_size``-th sample.
    """
    import random

    needed = plan.total_steps * plan.global_batch
    order: list[int] = []
    epoch = 0
    while len(order) < needed:
        permutation = list(range(n_samples))
        random.Random(seed + epoch).shuffle(permutation)
        order.extend(permutation)
        epoch += 1
    mine = order[:needed][rank :: plan.world_size]
    return [mine[i : i + plan.micro_batch] for i in range(0, len(mine), plan.micro_batch)]
