"""One training stage on a real DeepSpeed engine: the loop, checkpoints, resume, metrics.

Runs under the ``deepspeed`` launcher (which sets RANK, WORLD_SIZE, ...) or as one
plain process (it then sets them for a world of one). On a CPU machine set
``DS_ACCELERATOR=cpu``; precision ``auto`` is bf16 on GPUs and fp32 on CPU.

Resume: a checkpoint is written every ``save_every`` optimizer steps and at the end,
with the step in DeepSpeed's client state. A restarted job loads the newest one and
skips exactly the micro-batches already trained on (:func:`micro_batch_order`), so
the data order and the loss curve continue where they stopped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mgllava.config import StageConfig
from mgllava.model.vision import FrozenImageFeatures
from mgllava.train.schedule import StepPlan, deepspeed_config, micro_batch_order, plan_steps

log = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    step: int
    loss: float
    lr: float
    grad_norm: float
    samples_per_s: float
    tokens_per_s: float
    skipped: int  # samples dropped in this step (missing or corrupt images)


@dataclass
class StageResult:
    steps: int  # optimizer steps completed in total
    resumed_from: int  # the step the run resumed at (0 for a fresh start)
    checkpoint_dir: Path
    metrics: list[StepMetrics] = field(default_factory=list)  # steps run by this process
    skipped: Counter = field(default_factory=Counter)  # reason -> unusable samples, over the whole stage


def ensure_distributed_env() -> None:
    """Make a plain process look like a one-rank ``deepspeed`` launch."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def resolve_precision(precision: str) -> str:
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if precision == "auto":
        return "fp32" if on_cpu else "bf16"
    if on_cpu and precision != "fp32":
        raise ValueError(f"precision {precision} needs a GPU; use fp32 (or auto) on a CPU")
    return precision


def to_device(batch, device, dtype: torch.dtype | None = None):
    """Move tensors (in dicts/lists) to ``device``; floating tensors to ``dtype`` if given, except
    the ``boxes`` (pixel coordinates stay float32: bfloat16 holds 768 only to the nearest 4)."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, FrozenImageFeatures):
        return batch.to(device, dtype)
    if isinstance(batch, dict):
        return {k: to_device(v, device, None if k == "boxes" else dtype) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    return batch


def _latest_step(checkpoint_dir: Path) -> int:
    latest = checkpoint_dir / "latest"
    return int(latest.read_text().strip().removeprefix("step_")) if latest.exists() else 0


def run_stage(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    collate: Callable,
    stage: StageConfig,
    stage_name: str,
    checkpoint_dir: str | Path,
    seed: int,
    num_workers: int = 0,
    on_metrics: Callable[[list[StepMetrics]], None] | None = None,
    progress: bool = True,
) -> StageResult:
    """Train ``model`` (its trainable parameters) for one stage; resume if a checkpoint exists.

    ``collate`` turns a list of dataset items into a batch dict with the model's keyword
    arguments plus ``skipped`` (the samples it had to drop) and ``n_tokens``. ``on_metrics`` receives each logging step's metrics (rank 0 only), as they happen.
    """
    import deepspeed
    from tqdm import tqdm

    ensure_distributed_env()
    deepspeed.init_distributed(dist_backend=None, verbose=False)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    plan = plan_steps(stage, len(dataset), world_size, stage_name)
    precision = resolve_precision(stage.precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=trainable,
        config=deepspeed_config(stage, plan, precision),
    )
    checkpoint_dir = Path(checkpoint_dir)
    start_step, result_skipped = 0, Counter()
    if _latest_step(checkpoint_dir):
        _, client_state = engine.load_checkpoint(str(checkpoint_dir))
        start_step = int(client_state["step"])
        result_skipped = Counter(client_state.get("skipped", {}))
        log.info("%s: resumed from %s at step %d/%d", stage_name, checkpoint_dir, start_step, plan.total_steps)
    batches = micro_batch_order(len(dataset), plan, seed, rank)[start_step * plan.grad_accum :]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    result = StageResult(
        steps=start_step, resumed_from=start_step, checkpoint_dir=checkpoint_dir, skipped=result_skipped
    )
    bar = tqdm(
        total=plan.total_steps,
        initial=start_step,
        desc=stage_name,
        unit="step",
        disable=not progress or rank != 0,
    )
    step_started = time.perf_counter()  # wall time per step includes loading its data
    for step, micro_batches in _group(iter(loader), plan, start_step):
        losses, samples, tokens, skipped = [], 0, 0, 0
        for batch in micro_batches:
            result.skipped.update(item.reason for item in batch["skipped"])
            skipped += len(batch.pop("skipped"))
            n_tokens = batch.pop("n_tokens")
            if batch["input_ids"].numel() == 0:  # every sample of this micro-batch was unusable
                continue
            loss = engine(**to_device(batch, engine.device, dtype)).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            samples += len(batch["input_ids"])
            tokens += n_tokens
        elapsed = max(time.perf_counter() - step_started, 1e-9)
        grad_norm = engine.get_global_grad_norm()
        metrics = StepMetrics(
            step=step,
            loss=sum(losses) / max(len(losses), 1),
            lr=scheduler.get_last_lr()[0],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            samples_per_s=samples * world_size / elapsed,
            tokens_per_s=tokens * world_size / elapsed,
            skipped=skipped,
        )
        result.metrics.append(metrics)
        result.steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.loss:.4f}", lr=f"{metrics.lr:.2e}")
        if rank == 0 and on_metrics and (step % stage.log_every == 0 or step == plan.total_steps):
            on_metrics([metrics])  # a resumed run re-logs the steps after its checkpoint: rows are replaced
        if step % stage.save_every == 0 or step == plan.total_steps:
            engine.save_checkpoint(
                str(checkpoint_dir), tag=f"step_{step}", client_state={"step": step, "skipped": dict(result.skipped)}
            )
        step_started = time.perf_counter()  # checkpoints and metric writes are not the next step's time
    bar.close()
    if rank == 0:
        (checkpoint_dir / "plan.json").write_text(json.dumps(plan.__dict__, indent=2))
    return result


def _group(batches: Iterator[dict], plan: StepPlan, start_step: int) -> Iterator[tuple[int, list[dict]]]:
    """Yield ``(optimizer_step, its grad_accum micro-batches)``, numbering steps from 1."""
    for step in range(start_step + 1, plan.total_steps + 1):
        yield step, [next(batches) for _ in range(plan.grad_accum)]
