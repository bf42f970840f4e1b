"""Training throughput of full-size MG-LLaVA on one GPU: samples/s, peak memory, MFU.

The model is the full-size vision path of SPEC section 2 with random weights (CLIP
ViT-L/14-336 and the OpenCLIP ConvNeXt-Large-D-320 trunk, built by
``mgllava.model.random_full_size_encoders``; high-res 768, low-res 336, RoIAlign 56 over 2880
channels, ``direct`` object features) around a Llama-shaped LLM with random weights: ``--llm 1b``
(hidden 2048, 16 layers, 32 heads, MLP 5632, vocabulary 32000) or ``--llm vicuna-7b`` (hidden
4096, 32 layers, 32 heads, MLP 11008). It is trained by the project's own loop,
:func:`mgllava.train.engine.run_stage`: a DeepSpeed ZeRO-2 engine with the client
``torch.optim.AdamW`` (fused where the parameters' device has the kernel), bf16 on a GPU
(``precision: auto``), WarmupCosineLR, grad-norm clipping 1.0; ``--gradient-checkpointing``
recomputes the LLM's layers in the backward pass (as the full-size presets do).

Data are synthetic and held in memory (the collate of the real loop still runs): every
sample has one 768 x 768 image (random normal pixels), ``--boxes`` boxes, and random text
token ids with the image placeholder near the start; by default the text fills the LLM
context exactly (2048 = text + 576 image tokens + the object tokens). Loss on the text
after the first 64 tokens.

Reported over the steps after ``--warmup``: samples/s and LLM tokens/s (the engine's wall
time per optimizer step, data loading included), peak ``torch.cuda.max_memory_allocated``
over the stage, and the model FLOP utilisation against ``--peak-tflops`` (989: the H100
SXM dense bf16 figure) under two counts of the FLOPs per sample:

- ``analytic``: k x (N_llm x T + N_head x L) + 6 x sum(N_m x T_m) over the trainable
  projectors/fusion + F_vision. N_llm: the LLM's parameters without the input embedding table
  and the output projection (N_head); T: LLM tokens per sample; L: the tokens with a loss, the
  only ones training projects to the vocabulary (``loss_only``); k = 6 in finetune (forward + input and weight
  gradients), 4 in pretrain (the frozen LLM still back-propagates to the image tokens).
  T_m: the tokens each projector maps (576 image tokens; the boxes). F_vision: the frozen
  towers' forward, counted once with ``torch.utils.flop_counter`` (no backward). Attention
  score/value products are left out, as in the 6ND convention.
- ``counted``: ``torch.utils.flop_counter.FlopCounterMode`` over one real forward +
  backward of two samples before training, without checkpointing (matrix products,
  convolutions, attention counted as full, not causal; RoIAlign, norms and element-wise work
  not counted). Neither count includes checkpointing's recomputation: MFU, not hardware FLOP
  utilisation.

Checkpoint writes are switched off (``DeepSpeedEngine.save_checkpoint`` patched to write nothing):
they are not part of a training step and would write ~13 GB per save at this size.

    python benchmarks/train_step_gpu.py [--stage finetune|pretrain] [--micro-batch 4]
        [--grad-accum 1] [--steps 8] [--warmup 3] [--boxes 16] [--text-tokens N] [--size full|tiny]
        [--llm 1b|vicuna-7b] [--gradient-checkpointing]

``--size tiny`` (small towers and LLM) checks the script on a CPU in seconds
(``DS_ACCELERATOR=cpu`` is set when no GPU is visible; precision is then fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for mgllava

from model_step import random_boxes  # noqa: E402  (benchmarks/model_step.py)

from mgllava.config import StageConfig  # noqa: E402
from mgllava.model import (  # noqa: E402
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    HighResEncoder,
    LowResEncoder,
    MGLLaVAConfig,
    MGLLaVAForConditionalGeneration,
    MGLLaVAProcessor,
    downsample,
    random_full_size_encoders,
)
from mgllava.shapes.zoo import CLIP_MEAN, CLIP_STD  # noqa: E402

GiB = 2**30
UNLABELLED_PREFIX = 64  # leading tokens of a synthetic sample without a loss (system prompt, question, image)

# name -> (high_res, low_res, roi_output, max_length, Llama config kwargs of the default LLM)
SIZES = {
    "full": (768, 336, 56, 2048, None),  # the LLM: --llm
    "tiny": (
        256,
        112,
        7,
        256,
        dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
    ),
}
# the Llama shapes of ``--size full`` (random weights)
LLMS = {
    "1b": dict(  # the shape of benchmarks/RESULTS.md's MFU figures
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "vicuna-7b": dict(  # Vicuna-1.5-7B (Llama-2-7B): 6.74 B parameters
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
}


def llm_shape(size: str, llm: str) -> dict:
    """The Llama config kwargs of ``--size`` and ``--llm`` (the tiny size has its own)."""
    return SIZES[size][4] or LLMS[llm]


def tiny_encoders() -> tuple[LowResEncoder, HighResEncoder]:
    import timm
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=112,
            patch_size=14,
        )
    )
    return LowResEncoder(clip, -2), HighResEncoder(timm.create_model("convnext_atto", pretrained=False))


def build_model(
    size: str, stage: str, device: torch.device, object_features: str = "direct", llm_name: str = "1b"
) -> tuple[MGLLaVAForConditionalGeneration, MGLLaVAProcessor]:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    high_res, low_res, roi, max_length, _ = SIZES[size]
    llm_kwargs = llm_shape(size, llm_name)
    torch.manual_seed(0)
    with device:  # initialise the random weights where they will live
        low_res_encoder, high_res_encoder = random_full_size_encoders() if size == "full" else tiny_encoders()
        llm = LlamaForCausalLM(LlamaConfig(max_position_embeddings=max_length, **llm_kwargs))
    n_image_tokens = low_res_encoder.grid**2
    # only ``collate`` and the placeholder expansion are used (text is synthetic token ids): a
    # three-token tokenizer gives the pad, BOS and EOS ids
    specials = {"<pad>": 0, "<s>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(specials, unk_token="<pad>")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    processor = MGLLaVAProcessor(
        tokenizer, "vicuna_v1", high_res, CLIP_MEAN, CLIP_STD, max_text_length=max_length - n_image_tokens,
        image_seq_length=n_image_tokens,
    )
    config = MGLLaVAConfig(text_config=llm.config, vision_config=low_res_encoder.clip.config, template="vicuna_v1",
                           high_res=high_res, low_res=low_res, object_features=object_features, roi_output=roi,
                           max_length=max_length)
    model = MGLLaVAForConditionalGeneration(config, llm, low_res_encoder, high_res_encoder).to(device)
    model.set_stage(stage)
    return model, processor


class SyntheticConversations(torch.utils.data.Dataset):
    """``n`` samples drawn from a pool of ``pool`` distinct ones (built up front)."""

    def __init__(self, processor: MGLLaVAProcessor, n: int, pool: int, high_res: int, vocab: int, text_tokens: int,
                 boxes: int):
        generator = torch.Generator().manual_seed(0)
        self.n, self.items = n, []
        for _ in range(pool):
            input_ids = torch.randint(3, vocab, (text_tokens,), generator=generator)
            input_ids[0], input_ids[min(35, text_tokens - 1)] = 1, IMAGE_TOKEN_INDEX  # BOS, then <image>
            labels = input_ids.clone()
            labels[:UNLABELLED_PREFIX] = IGNORE_INDEX  # system prompt + question + image: no loss
            input_ids, labels = processor.expand_placeholders(input_ids, labels, [boxes])
            self.items.append(
                {
                    "input_ids": input_ids,
                    "labels": labels,
                    "pixel_values": torch.randn(1, 3, high_res, high_res, generator=generator),
                    "boxes": [random_boxes(boxes, high_res, generator)],
                }
            )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.items[index % len(self.items)]


def count_flops(model: MGLLaVAForConditionalGeneration, batch: dict, dtype: torch.dtype | None) -> tuple[int, int]:
    """(FLOPs of one forward + backward of ``batch``, FLOPs of the frozen towers' forward on one image)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mgllava.train.engine import to_device

    batch = to_device(batch, model.device, dtype)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(**batch, loss_only=True).loss.backward()
    step = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    pixel_values = batch["pixel_values"][:1]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.high_res_encoder(pixel_values)
        model.low_res_encoder(downsample(pixel_values, model.config.low_res))
    return step, counter.get_total_flops()


def breakdown(model: MGLLaVAForConditionalGeneration, batch: dict, dtype: torch.dtype | None, reps: int = 5) -> dict[str, float]:
    """Median seconds per micro-batch of the parts of a step, timed outside the engine (after one warm-up):
    each frozen tower's forward, object-feature pooling by both methods, the whole image path
    (``encode_images``, no autograd), and the model's forward + backward (no optimizer)."""
    from mgllava.model import pool_object_features
    from mgllava.train.engine import to_device

    batch = to_device(batch, model.device, dtype)
    pixel_values, boxes = batch["pixel_values"], batch["boxes"]
    config = model.config

    def timed(fn) -> float:
        times = []
        for _ in range(reps + 1):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def forward_backward():
        model(**batch, loss_only=True).loss.backward()
        model.zero_grad(set_to_none=True)

    model.train()
    parts = {}
    with torch.no_grad():
        parts["high-res tower forward"] = timed(lambda: model.high_res_encoder(pixel_values))
        parts["low-res tower forward"] = timed(
            lambda: model.low_res_encoder(downsample(pixel_values, config.low_res))
        )
        maps = model.high_res_encoder(pixel_values)
        for method in ("direct", "lean"):
            parts[f"object features ({method})"] = timed(
                lambda method=method, maps=maps: pool_object_features(
                    maps, boxes, config.high_res, config.roi_output, method
                )
            )
        del maps
        parts[f"image path (encode_images, {model.config.object_features})"] = timed(
            lambda: model.encode_images(pixel_values, boxes)
        )
    parts["model forward + backward"] = timed(forward_backward)
    return parts


def forward_backward_times(
    model: MGLLaVAForConditionalGeneration, batch: dict, dtype: torch.dtype | None, warmup: int, steps: int
) -> tuple[list[float], list[float]]:
    """Seconds of each of ``steps`` forward + backward passes of ``batch`` after ``warmup`` ones (gradients
    dropped after each), and the first and last loss."""
    from mgllava.train.engine import to_device

    batch = to_device(batch, model.device, dtype)
    model.train()
    seconds, losses = [], []
    for _ in range(warmup + steps):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**batch, loss_only=True).loss
        loss.backward()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        model.zero_grad(set_to_none=True)
    return seconds[warmup:], [losses[0], losses[-1]]


def matmul_tflops(device: torch.device) -> float | None:
    """Measured bf16 rate of an 8192^3 matrix product (random data; median of 10 after 3 warm-ups)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / statistics.median(times) / 1e12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--llm", choices=sorted(LLMS), default="1b", help="the LLM's shape at --size full (default 1b)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute the LLM's activations in the backward pass"
    )
    parser.add_argument("--stage", choices=("finetune", "pretrain"), default="finetune")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per forward pass (default 4)")
    parser.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)"
    )
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps (default 8)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="optimizer steps run before measuring (default 3)"
    )
    parser.add_argument("--boxes", type=int, default=16, help="boxes per image (default 16)")
    parser.add_argument(
        "--text-tokens", type=int, help="text tokens per sample, <image> included (default: fill the context)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)"
    )
    parser.add_argument(
        "--object-features",
        choices=("direct", "lean"),
        default="direct",
        help="RoIAlign method (SPEC section 4)",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the parts of a step outside the engine"
    )
    parser.add_argument(
        "--forward-backward-only",
        action="store_true",
        help="time the model's forward + backward alone (no optimizer, no DeepSpeed): the memory of the model, "
        "its gradients and activations, for an LLM whose optimizer states do not fit on one card",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import deepspeed.runtime.engine

    from mgllava.train.data import Collate
    from mgllava.train.engine import fused_adamw_supported, resolve_precision, run_stage

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, device {gpu}", flush=True)
    measured_matmul = matmul_tflops(device)
    if measured_matmul:
        print(f"bf16 8192^3 matmul: {measured_matmul:.0f} TFLOP/s (measured ceiling)", flush=True)

    started = time.perf_counter()
    model, processor = build_model(args.size, args.stage, device, args.object_features, args.llm)
    high_res, _, _, max_length, _ = SIZES[args.size]
    llm_kwargs = llm_shape(args.size, args.llm)
    n_image_tokens = model.low_res_encoder.grid**2
    text_tokens = args.text_tokens or max_length - n_image_tokens - args.boxes + 1
    llm_tokens = min(
        text_tokens - 1 + n_image_tokens + args.boxes, max_length
    )  # per sample, after the splice
    print(
        f"built the model in {time.perf_counter() - started:.0f} s\n{model.trainable_summary()}", flush=True
    )

    global_batch = args.micro_batch * args.grad_accum
    n_samples = (args.warmup + args.steps) * global_batch
    dataset = SyntheticConversations(
        processor, n_samples, min(n_samples, 16), high_res, llm_kwargs["vocab_size"], text_tokens, args.boxes
    )
    collate = Collate(processor)
    stage = StageConfig(
        global_batch=global_batch,
        micro_batch=args.micro_batch,
        lr=2e-5,
        epochs=1,
        save_every=10**6,
        zero_stage=2,
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(stage.precision))

    # FLOPs: one counted forward + backward of two samples (before the engine, and before checkpointing, whose
    # recomputation is not model FLOPs; the grads are dropped), and the analytic count
    def batch_of(n: int) -> dict:
        batch = collate([dataset[i] for i in range(n)])
        batch.pop("skipped"), batch.pop("n_tokens")
        return batch

    model.to(dtype or torch.float32)
    counted_samples = min(args.micro_batch, 2)
    counted_step, vision_forward = count_flops(model, batch_of(counted_samples), dtype)
    counted_per_sample = counted_step / counted_samples
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    parts = breakdown(model, batch_of(args.micro_batch), dtype) if args.breakdown else {}
    n_head = model.llm.get_output_embeddings().weight.numel()
    n_llm = sum(p.numel() for p in model.llm.parameters()) - model.llm.get_input_embeddings().weight.numel() - n_head
    labelled_tokens = text_tokens - UNLABELLED_PREFIX  # per sample: the targets with a loss
    k = 6 if args.stage == "finetune" else 4
    n_fusion = sum(p.numel() for p in model.fusion.parameters())
    n_projector = sum(p.numel() for p in model.projector.parameters())
    n_box_projector = sum(p.numel() for p in model.box_projector.parameters())
    analytic_per_sample = (
        k * (n_llm * llm_tokens + n_head * labelled_tokens)
        + 6 * ((n_fusion + n_projector) * n_image_tokens + n_box_projector * args.boxes)
        + vision_forward
    )

    def no_checkpoint(self, save_dir: str, tag: str, **kwargs) -> bool:  # see the docstring
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)  # the folder run_stage marks complete
        return True

    deepspeed.runtime.engine.DeepSpeedEngine.save_checkpoint = no_checkpoint
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if args.forward_backward_only:
        seconds, losses = forward_backward_times(model, batch_of(args.micro_batch), dtype, args.warmup, args.steps)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "ckpt").mkdir()
            result = run_stage(
                model, dataset, collate, stage, args.stage, Path(tmp) / "ckpt", seed=0, progress=False
            )
        seconds = [global_batch / m.samples_per_s for m in result.metrics[args.warmup :]]
        losses = [result.metrics[0].loss, result.metrics[-1].loss]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else None
    samples_per_s = global_batch * len(seconds) / sum(seconds)
    peak_flops = args.peak_tflops * 1e12
    results = {
        "device": gpu,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "size": args.size,
        "llm": args.llm if args.size == "full" else "tiny",
        "gradient_checkpointing": args.gradient_checkpointing,
        "fused_adamw": fused_adamw_supported([p for p in model.parameters() if p.requires_grad]),
        "stage": args.stage,
        "precision": str(dtype).removeprefix("torch.") if dtype else "fp32",
        "zero_stage": stage.zero_stage,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "boxes": args.boxes,
        "object_features": args.object_features,
        "text_tokens": text_tokens,
        "llm_tokens_per_sample": llm_tokens,
        "params_llm_total": sum(p.numel() for p in model.llm.parameters()),
        "params_llm_no_embedding": n_llm + n_head,
        "labelled_tokens_per_sample": labelled_tokens,
        "params_vision_frozen": sum(
            p.numel() for m in (model.low_res_encoder, model.high_res_encoder) for p in m.parameters()
        ),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "warmup_steps": args.warmup,
        "measured_steps": len(seconds),
        "timed": "forward + backward (no optimizer)" if args.forward_backward_only else "DeepSpeed training step",
        "step_s_median": statistics.median(seconds),
        "step_s_min": min(seconds),
        "step_s_max": max(seconds),
        "samples_per_s": samples_per_s,
        "llm_tokens_per_s": samples_per_s * llm_tokens,
        "loss_first_last": losses,
        "peak_allocated_gib": peak / GiB if peak else None,
        "peak_reserved_gib": reserved / GiB if reserved else None,
        "vision_forward_tflop_per_image": vision_forward / 1e12,
        "analytic_tflop_per_sample": analytic_per_sample / 1e12,
        "counted_tflop_per_sample": counted_per_sample / 1e12,
        "peak_tflops": args.peak_tflops,
        "measured_matmul_tflops": measured_matmul,
        "mfu_analytic": samples_per_s * analytic_per_sample / peak_flops,
        "mfu_counted": samples_per_s * counted_per_sample / peak_flops,
        "breakdown_s_per_micro_batch": parts,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    memory = f"{results['peak_allocated_gib']:.1f} GiB" if peak else "n/a (cpu)"
    print(
        f"\n{args.size} ({results['llm']} LLM{', checkpointed' if args.gradient_checkpointing else ''}) "
        f"{args.stage} micro-batch {args.micro_batch} x accum {args.grad_accum}, "
        f"{llm_tokens} LLM tokens/sample, {args.boxes} boxes: {samples_per_s:.2f} samples/s "
        f"({results['llm_tokens_per_s']:.0f} LLM tokens/s), step {results['step_s_median']:.3f} s median; "
        f"peak memory {memory}; MFU analytic {100 * results['mfu_analytic']:.1f}%, "
        f"counted {100 * results['mfu_counted']:.1f}% of {args.peak_tflops:.0f} TFLOP/s"
    )
    if parts:
        print(f"parts of a step, s per micro-batch of {args.micro_batch} (outside the engine):")
        for name, seconds in parts.items():
            print(f"  {name:<40} {seconds:.4f}")
        step = results["step_s_median"] / args.grad_accum
        print(f"  {'engine step - forward/backward':<40} {step - parts['model forward + backward']:.4f}")
    print(json.dumps({"benchmark": "train_step_gpu", **results}))  # the last line: every figure
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
