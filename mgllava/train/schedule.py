"""Step arithmetic and the DeepSpeed configuration of one training stage (SPEC section 6).

Kept free of torch and DeepSpeed imports, so a bad batch setting fails at start-up,
before any model is loaded.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from mgllava.config import ConfigError, StageConfig

log = logging.getLogger(__name__)

AUTO = "auto"  # in a user DeepSpeed JSON: keep the generated value (the Hugging Face / XTuner convention)
CONTROLLED = {  # keys of the DeepSpeed config the pipeline sets from its own fields
    "train_batch_size": "train.<stage>.global_batch",
    "train_micro_batch_size_per_gpu": "train.<stage>.micro_batch",
    "gradient_accumulation_steps": "train.<stage>.global_batch / (micro_batch x world size)",
    "optimizer": "train.<stage>.lr, betas and weight_decay (the client AdamW; DeepSpeed would ignore this)",
    "bf16.enabled": "train.<stage>.precision",
    "fp16.enabled": "train.<stage>.precision",
}


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


def _dotted(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; a key whose value is a dict is also listed with that dict."""
    flat = {}
    for key, value in tree.items():
        flat[prefix + key] = value
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
    return flat


def load_user_deepspeed_config(path: str | Path | None) -> dict | None:
    """Read ``train.deepspeed_config``: a JSON object to merge over the generated config (None: none).

    Refuses, naming the file and key, a file that does not read as a JSON object, and a key the
    pipeline controls (:data:`CONTROLLED`) given a value other than ``"auto"``: batch sizes and
    accumulation follow from the stage's fields (resume relies on them), the optimizer is the
    client AdamW, precision is ``train.<stage>.precision``.
    """
    if path is None:
        return None
    try:
        user = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"train.deepspeed_config: cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object")
    for key, value in _dotted(user).items():
        if key in CONTROLLED and value != AUTO:
            raise ConfigError(
                f"train.deepspeed_config: {path} sets '{key}', which the pipeline controls through "
                f"{CONTROLLED[key]}; remove it or give it as \"auto\""
            )
    return user


def merge_deepspeed_config(generated: dict, user: dict, prefix: str = "") -> dict:
    """``user`` deep-merged over ``generated``: objects merge key by key, other values replace, and
    ``"auto"`` keeps the generated value (or adds nothing). A warning names each generated value replaced."""
    merged = dict(generated)
    for key, value in user.items():
        if value == AUTO:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_deepspeed_config(merged[key], value, f"{prefix}{key}.")
        else:
            if key in merged and merged[key] != value:
                log.warning("train.deepspeed_config replaces %s%s=%s with %s", prefix, key, json.dumps(merged[key]),
                            json.dumps(value))
            merged[key] = value
    return merged


def deepspeed_config(stage: StageConfig, plan: StepPlan, precision: str, user: dict | None = None) -> dict:
    """The DeepSpeed config: ZeRO stage, batch split, clipping, precision, warm-up + cosine,
    with ``user`` (:func:`load_user_deepspeed_config`) merged over it (:func:`merge_deepspeed_config`).

    ``precision`` is the resolved one (:func:`~mgllava.train.engine.resolve_precision`: ``fp32``,
    ``bf16``, ``fp16`` or ``autocast-bf16``). The optimizer is a
    client ``torch.optim.AdamW`` (it runs on every accelerator, CPU included); the
    scheduler is DeepSpeed's ``WarmupCosineLR``: linear warm-up from ``lr x
    warmup_start_factor`` over ``warmup_steps``, then cosine to 0.
    """
    generated = {
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
    if precision == "autocast-bf16":  # otherwise left to the user's JSON, as any DeepSpeed option
        generated["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return merge_deepspeed_config(generated, user) if user else generated


def modality_lengths(records: list[dict]) -> list[int]:
    """Each record's text length in characters (at least 1), negative for a text-only record (no
    ``image``): the key of the finetune's length grouping. The reference uses token counts; characters
    rank the records the same way closely enough, without tokenizing the corpus at start-up."""
    return [
        max(1, sum(len(str(turn.get("value", ""))) for turn in record["conversations"]))
        * (1 if record.get("image") is not None else -1)
        for record in records
    ]


def mega_batch_size(n_samples: int, global_batch: int) -> int:
    """Samples per mega-batch of the length grouping: ``global_batch`` times 50, or times what makes
    four mega-batches of the corpus if fewer (at least 1), as LLaVA's LengthGroupedSampler."""
    return global_batch * max(1, min(n_samples // (global_batch * 4), 50))


def length_grouped_epoch(lengths: list[int], group_size: int, rng) -> list[int]:
    """One epoch's order, grouped by modality and length (LLaVA's ``group_by_modality_length``).

    The image samples (positive lengths) and the text-only ones (negative) are each shuffled and cut
    into mega-batches of ``group_size``, each sorted longest first; the full mega-batches are shuffled
    together, the one holding the longest sample is moved to the front (an out-of-memory shows in the
    first step), and each modality's partial last mega-batch follows at the end. With ``group_size``
    a multiple of the global batch, a global batch mixes the two modalities only at the one boundary
    between the partial mega-batches (none when both modalities fill whole mega-batches).
    """
    full, partial = [], []
    for is_image in (True, False):
        members = [i for i, length in enumerate(lengths) if (length > 0) == is_image]
        rng.shuffle(members)
        for start in range(0, len(members), group_size):
            chunk = sorted(members[start : start + group_size], key=lambda i: -abs(lengths[i]))
            (full if len(chunk) == group_size else partial).append(chunk)
    rng.shuffle(full)
    if full:
        longest = max(range(len(full)), key=lambda k: abs(lengths[full[k][0]]))
        full.insert(0, full.pop(longest))
    return [i for chunk in full + partial for i in chunk]


def micro_batch_order(
    n_samples: int, plan: StepPlan, seed: int, rank: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """Every micro-batch this rank will see, in order: a pure function of its arguments, so a
    resumed run skips exactly the micro-batches it already trained on.

    Epoch ``e`` is an order of all the samples seeded by ``seed + e``: a random permutation, or with
    ``lengths`` (:func:`modality_lengths`) :func:`length_grouped_epoch` over mega-batches of
    :func:`mega_batch_size`. Epochs are chained and sliced into global batches; rank ``r`` takes
    every ``world_size``-th sample.
    """
    import random

    if lengths is not None and len(lengths) != n_samples:
        raise ValueError(f"{len(lengths)} lengths for {n_samples} samples")
    needed = plan.total_steps * plan.global_batch
    order: list[int] = []
    epoch = 0
    while len(order) < needed:
        rng = random.Random(seed + epoch)
        if lengths is None:
            permutation = list(range(n_samples))
            rng.shuffle(permutation)
        else:
            permutation = length_grouped_epoch(lengths, mega_batch_size(n_samples, plan.global_batch), rng)
        order.extend(permutation)
        epoch += 1
    mine = order[:needed][rank :: plan.world_size]
    return [mine[i : i + plan.micro_batch] for i in range(0, len(mine), plan.micro_batch)]
