"""One training stage on a real DeepSpeed engine: the loop, checkpoints, resume, metrics.

Runs under the ``deepspeed`` launcher (which sets RANK, WORLD_SIZE, ...) or as one
plain process (it then sets them for a world of one). On a CPU machine set
``DS_ACCELERATOR=cpu``; precision ``auto`` is bf16 on GPUs and fp32 on CPU, where ``bf16`` runs the
fp32 model under ``torch.autocast`` (:func:`resolve_precision`).

Resume: a checkpoint is written every ``save_every`` optimizer steps and at the end,
with the step in DeepSpeed's client state; once every rank has written its part, rank 0
marks it complete (``step_N/complete``) and deletes all but the newest ``keep_checkpoints``.
A restarted job loads the newest complete checkpoint whose files open (a warning names
each one passed over, and an empty or dangling ``latest`` tag) and skips exactly the
micro-batches already trained on (:func:`micro_batch_order`), so the data order and the
loss curve continue where they stopped. :func:`check_content_key` (called by the job on
rank 0 before it loads anything) refuses checkpoints made under another content key (what
the stage's output depends on, by part) with :class:`ResumeRefused`, naming the parts that
changed, instead of resuming them.

A step's logged loss is the mean over every rank's micro-batches, so a run on N ranks
logs what one rank logs at the same global batch.

Fault injection (the kill -9 tests): ``MGLLAVA_FAULT=<point>:<step>`` makes
:func:`fault_point` SIGKILL the process at that point of that step: ``step`` (between
two micro-batches), ``checkpoint`` (saved, not yet marked complete), ``warehouse``
(inside the metric write's transaction, see :mod:`mgllava.train.job`); a suffix
``@<rank>`` kills only that rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Full, Queue

import torch

from mgllava.config import ConfigError, StageConfig
from mgllava.model.vision import FrozenImageFeatures
from mgllava.torch_threads import helpers_on_one_thread
from mgllava.train.schedule import StepPlan, deepspeed_config, micro_batch_order, plan_steps

log = logging.getLogger(__name__)

STEP_LINE = "%s step %d/%d: loss %.4f, lr %.3e, %.2f samples/s"
"""The log line of each logging step (rank 0), which :mod:`mgllava.train.launch` reads back from a job's output."""

FAULT_ENV = "MGLLAVA_FAULT"
COMPLETE = "complete"  # the file that marks a checkpoint whose every part was written
CONTENT_KEY = "content_key.json"  # in the checkpoint directory: the key its checkpoints were made under


class ResumeRefused(ConfigError):
    """The stage's checkpoints were made from other inputs than this run's."""


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process if ``MGLLAVA_FAULT`` is ``<name>:<step>`` or ``<name>:<step>@<this rank>``
    (fault-injection tests only)."""
    if os.environ.get(FAULT_ENV) in (f"{name}:{step}", f"{name}:{step}@{os.environ.get('RANK', '0')}"):
        os.kill(os.getpid(), signal.SIGKILL)


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
    final_loss: float | None = None  # the last step's loss (from the checkpoint if this run trained none)


def ensure_distributed_env() -> None:
    """Make a plain process look like a one-rank ``deepspeed`` launch."""
    from mgllava.train.launch import free_port

    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def release_shared_memory_names(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce workspace, once every rank holds all of them.

    Under the ``deepspeed`` launcher on a CPU, DeepSpeed's shm op (``init_distributed``) maps each rank's
    workspace (about 66 MB) as ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` and never
    removes the name, so every CPU job would leave its workspaces in memory until the machine restarts.
    Every rank opens every other's while it initialises; after the barrier all are open, and removing the
    names frees nothing that is in use: the memory goes when the last process that mapped it exits, also
    if it is killed. Other accelerators have no such workspace (and no barrier here: NCCL's would run
    before each rank has its device)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    torch.distributed.barrier()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)


def resolve_precision(precision: str) -> str:
    """``train.<stage>.precision`` on this accelerator: ``fp32``, ``bf16`` or ``fp16`` (DeepSpeed's
    mixed precision: the model in that type, fp32 master weights), or on a CPU for ``bf16``,
    ``autocast-bf16``: the model, its gradients and the optimizer stay fp32 and matrix products run
    in bf16 under ``torch.autocast`` (DeepSpeed's ``torch_autocast``), which CPUs with bf16
    instructions run faster."""
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if precision == "auto":
        return "fp32" if on_cpu else "bf16"
    if on_cpu and precision == "fp16":
        raise ValueError("precision fp16 needs a GPU; use fp32 (or auto), or bf16 (autocast) on a CPU")
    return "autocast-bf16" if on_cpu and precision == "bf16" else precision


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


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The ``step_N`` directories, newest first."""
    found = [p for p in checkpoint_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=_step_of, reverse=True)


def _unusable(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None: not marked complete, or a file that does not open."""
    if not (checkpoint / COMPLETE).is_file():
        return "not marked complete (the run stopped while saving it)"
    for part in sorted(checkpoint.glob("*.pt")):
        try:
            zipfile.ZipFile(part).close()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{part.name} does not open ({exc})"
    return None


def resume_candidates(checkpoint_dir: Path, stage_name: str) -> list[Path]:
    """The usable checkpoints, newest first; a warning names each one passed over and a bad ``latest``."""
    latest = checkpoint_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag:
            log.warning("%s: %s is empty; looking for the newest usable checkpoint", stage_name, latest)
        elif not (checkpoint_dir / tag).is_dir():
            log.warning("%s: %s names %s, which does not exist; looking for the newest usable checkpoint",
                        stage_name, latest, tag)
    usable = []
    for checkpoint in _checkpoints(checkpoint_dir):
        reason = _unusable(checkpoint)
        if reason:
            log.warning("%s: passing over checkpoint %s: %s", stage_name, checkpoint, reason)
        else:
            usable.append(checkpoint)
    return usable


def check_content_key(checkpoint_dir: Path, content_key: dict, stage_name: str) -> None:
    """Refuse checkpoints made under another content key; record the key where there are none.

    ``content_key`` is ``{"key": digest, "parts": {name: digest}}``; the refusal names the parts that
    differ. Called on rank 0 before the stage loads its model.
    """
    recorded_file = checkpoint_dir / CONTENT_KEY
    if _checkpoints(checkpoint_dir):
        recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else None
        if recorded is None or recorded["key"] != content_key["key"]:
            parts = (recorded or {}).get("parts", {})
            changed = [name for name, digest in content_key["parts"].items() if parts.get(name) != digest]
            what = (f"were made from other inputs ({', '.join(changed)} changed)" if recorded
                    else "carry no content key (made by an older version)")
            raise ResumeRefused(
                f"{stage_name}: the checkpoints in {checkpoint_dir} {what}; resuming them would train the "
                f"wrong run. Start the stage over with `mgllava train --stage {stage_name} --fresh` "
                f"(in the flows: fresh=True), or delete {checkpoint_dir.parent}"
            )
        return
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    partial = recorded_file.with_suffix(".tmp")
    partial.write_text(json.dumps(content_key, indent=2))
    partial.replace(recorded_file)


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete every ``step_N`` directory but the newest ``keep`` complete ones."""
    kept = 0
    for checkpoint in _checkpoints(checkpoint_dir):
        if kept < keep and (checkpoint / COMPLETE).is_file():
            kept += 1
        else:
            shutil.rmtree(checkpoint)


def _resume(engine, checkpoint_dir: Path, stage_name: str, rank: int, world_size: int) -> dict | None:
    """Load the newest usable checkpoint into ``engine``; its client state, or None if there is none.

    Rank 0 picks the candidates (every rank loads the same one). A checkpoint that still fails to
    load passes to the one before it; if that was the last, the run stops (the engine may hold part
    of it), naming the checkpoint and ``--fresh``.
    """
    candidates = [resume_candidates(checkpoint_dir, stage_name) if rank == 0 else None]
    if world_size > 1:
        torch.distributed.broadcast_object_list(candidates, src=0)
    failed = None
    for checkpoint in candidates[0]:
        try:
            loaded, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=checkpoint.name)
            if loaded is not None:
                return client_state
            failed = f"{checkpoint}: DeepSpeed found nothing to load"
        except Exception as exc:  # a torn file the open check missed: try the one before
            failed = f"{checkpoint}: {type(exc).__name__}: {exc}"
        log.warning("%s: checkpoint did not load (%s); trying the one before", stage_name, failed)
    if failed:
        raise RuntimeError(f"{stage_name}: no checkpoint in {checkpoint_dir} loads (last: {failed}); "
                           f"start over with --fresh")
    return None


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
    keep_checkpoints: int = 2,
    deepspeed_overrides: dict | None = None,
    lengths: list[int] | None = None,
) -> StageResult:
    """Train ``model`` (its trainable parameters) for one stage; resume if a usable checkpoint exists.

    ``collate`` turns a list of dataset items into a batch dict with the model's keyword
    arguments plus ``skipped`` (the samples it had to drop) and ``n_tokens``. ``on_metrics``
    receives each logging step's metrics (rank 0 only), as they happen. ``deepspeed_overrides``
    (``train.deepspeed_config``, read by :func:`~mgllava.train.schedule.load_user_deepspeed_config`)
    is merged over the generated DeepSpeed config. ``lengths`` (the samples' signed lengths,
    :func:`~mgllava.train.schedule.modality_lengths`) groups the data order by modality and length.
    """
    import deepspeed
    from tqdm import tqdm

    ensure_distributed_env()
    deepspeed.init_distributed(dist_backend=None, verbose=False)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    release_shared_memory_names(rank)
    plan = plan_steps(stage, len(dataset), world_size, stage_name)
    precision = resolve_precision(stage.precision)
    model.train()  # a loaded transformers model starts in eval mode, where it skips gradient checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay,
                                  fused=fused_adamw_supported(trainable))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=trainable,
        config=deepspeed_config(stage, plan, precision, deepspeed_overrides),
    )
    checkpoint_dir = Path(checkpoint_dir)
    client_state = _resume(engine, checkpoint_dir, stage_name, rank, world_size) or {}
    start_step = int(client_state.get("step", 0))
    if start_step:
        log.info("%s: resumed from %s at step %d/%d", stage_name, checkpoint_dir, start_step, plan.total_steps)
    batches = micro_batch_order(len(dataset), plan, seed, rank, lengths)[start_step * plan.grad_accum :]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=engine.device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
    )
    loaded = prefetch(iter(loader))  # the next batches load while this one trains
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    result = StageResult(
        steps=start_step,
        resumed_from=start_step,
        checkpoint_dir=checkpoint_dir,
        skipped=Counter(client_state.get("skipped", {})),
        final_loss=client_state.get("loss"),
    )
    bar = tqdm(
        total=plan.total_steps,
        initial=start_step,
        desc=stage_name,
        unit="step",
        disable=not progress or rank != 0,
    )
    step_started = time.perf_counter()  # wall time per step includes loading its data
    pending: list[_PendingStep] = []  # steps whose loss is still on the device (read at the next logging step)
    with contextlib.closing(loaded):  # ends the prefetch thread, also when a step fails
        for step, micro_batches in _group(loaded, plan, start_step):
            loss_sum, n_losses, samples, tokens, skipped = torch.zeros((), device=engine.device), 0, 0, 0, 0
            for batch in micro_batches:
                result.skipped.update(item.reason for item in batch["skipped"])
                skipped += len(batch.pop("skipped"))
                n_tokens = batch.pop("n_tokens")
                if batch["input_ids"].numel() == 0:  # every sample of this micro-batch was unusable
                    continue
                loss = engine(**to_device(batch, engine.device, dtype), loss_only=True).loss
                engine.backward(loss)
                engine.step()
                loss_sum, n_losses = loss_sum + loss.detach().float(), n_losses + 1
                samples += len(batch["input_ids"])
                tokens += n_tokens
                fault_point("step", step)
            totals = torch.stack([loss_sum, torch.full((), float(n_losses), device=engine.device)])  # no host copy
            if world_size > 1:
                torch.distributed.all_reduce(totals)
            elapsed = max(time.perf_counter() - step_started, 1e-9)
            pending.append(_PendingStep(step, totals, scheduler.get_last_lr()[0], engine.get_global_grad_norm(),
                                        samples * world_size / elapsed, tokens * world_size / elapsed, skipped))
            result.steps = step
            bar.update(1)
            saving = step % stage.save_every == 0 or step == plan.total_steps
            if step % stage.log_every == 0 or saving:
                metrics = _resolve(pending)  # the one host sync of these steps
                pending = []
                result.metrics += metrics
                last = metrics[-1]
                result.final_loss = last.loss
                bar.set_postfix(loss=f"{last.loss:.4f}", lr=f"{last.lr:.2e}")
                if rank == 0 and (step % stage.log_every == 0 or step == plan.total_steps):
                    log.info(STEP_LINE, stage_name, step, plan.total_steps, last.loss, last.lr, last.samples_per_s)
                if rank == 0 and on_metrics:
                    on_metrics(metrics)  # a resumed run re-logs the steps after its checkpoint: rows are replaced
            if saving:
                state = {"step": step, "skipped": dict(result.skipped), "loss": result.final_loss}
                engine.save_checkpoint(str(checkpoint_dir), tag=f"step_{step}", client_state=state)  # ends in a barrier
                fault_point("checkpoint", step)
                if rank == 0:
                    (checkpoint_dir / f"step_{step}" / COMPLETE).write_text(json.dumps(state))
                    prune_checkpoints(checkpoint_dir, keep_checkpoints)
            step_started = time.perf_counter()  # checkpoints and metric writes are not the next step's time
    bar.close()
    if engine.zero_optimization_partition_weights():
        gather_partitioned_weights(engine, model, rank)
    if rank == 0:
        (checkpoint_dir / "plan.json").write_text(json.dumps(plan.__dict__, indent=2))
    return result


def gather_partitioned_weights(engine, model: torch.nn.Module, rank: int) -> None:
    """Under ZeRO-3 every rank holds a slice of each parameter: gather them (layer by layer, onto
    rank 0's CPU; every rank must call this) and give rank 0's ``model`` the whole weights, so that it
    saves and exports them as under the other ZeRO stages. The other ranks' models stay partitioned."""
    state = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        for name, parameter in model.named_parameters():
            parameter.data = state[name]


def fused_adamw_supported(parameters: list[torch.Tensor]) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` runs on these parameters: all floating point on one
    device type that has the fused kernel (CUDA, CPU, ...)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return bool(parameters) and all(
        p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices() for p in parameters
    )


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """``items``, produced up to ``depth`` ahead by a background thread (image decoding, resizing and
    tokenising release the GIL often enough to overlap the step); an exception is raised where its
    item would have been.

    The thread runs its torch operations (pixel normalisation, collation) on one intra-op thread
    (:func:`mgllava.torch_threads.helpers_on_one_thread`): the caller's count stays as it is.
    """
    queue: Queue = Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():  # the consumer may have stopped early
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        torch.set_num_threads(1)
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer
            put((done, exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    with helpers_on_one_thread():
        thread.start()
        try:
            while True:
                item, error = queue.get()
                if error is not None:
                    raise error
                if item is done:
                    return
                yield item
        finally:
            stop.set()


@dataclass
class _PendingStep:
    """A step's figures before its loss is read from the device."""

    step: int
    totals: torch.Tensor  # (2,): loss sum over the micro-batches, their number (all ranks)
    lr: float
    grad_norm: torch.Tensor | float | None
    samples_per_s: float
    tokens_per_s: float
    skipped: int


def _resolve(pending: list[_PendingStep]) -> list[StepMetrics]:
    """The steps' :class:`StepMetrics`, their losses and gradient norms read from the device at once."""
    norms = [torch.as_tensor(float("nan") if p.grad_norm is None else p.grad_norm, dtype=torch.float32,
                             device=p.totals.device) for p in pending]
    values = torch.cat([torch.stack([p.totals for p in pending]).float(), torch.stack(norms)[:, None]], 1).tolist()
    return [
        StepMetrics(step=p.step, loss=loss_sum / max(n, 1), lr=p.lr, grad_norm=norm, samples_per_s=p.samples_per_s,
                    tokens_per_s=p.tokens_per_s, skipped=p.skipped)
        for p, (loss_sum, n, norm) in zip(pending, values, strict=True)
    ]


def _group(batches: Iterator[dict], plan: StepPlan, start_step: int) -> Iterator[tuple[int, list[dict]]]:
    """Yield ``(optimizer_step, its grad_accum micro-batches)``, numbering steps from 1."""
    for step in range(start_step + 1, plan.total_steps + 1):
        yield step, [next(batches) for _ in range(plan.grad_accum)]
