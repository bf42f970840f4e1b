"""Forward + backward time and memory of one MG-LLaVA training step, and object-feature memory.

Measures, on the CPU (or a GPU with ``--device cuda``), with random weights:

1. ``tiny``: the tiny preset (zoo built in a temporary directory from a 24-image shapes world);
2. ``full vision``: the full-size vision path (CLIP ViT-L/14-336, ConvNeXt-Large-D at 768,
   fusion 1024/1536, RoIAlign 56 over 2880 channels) with a small Llama as the LLM;
3. object-feature memory at full size, ``direct`` vs ``lean`` (SPEC section 4): analytically
   (the bytes of the tensors each method materialises at its peak) and empirically (on the CPU
   the peak RSS increase over the call, sampled by a background thread, since torch
   allocations bypass tracemalloc; on a GPU the peak increase of
   ``torch.cuda.max_memory_allocated``).

A step is one pretrain-stage forward + backward (trainable: fusion, projector, box projector)
on ``--batch`` samples of one image with ``--boxes`` boxes each. Prints results, the last line one
JSON object with every figure; writes nothing outside a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
    os.environ.setdefault(_name, "1")

import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mgllava.model import (  # noqa: E402
    Boxes,
    MGLLaVAConfig,
    MGLLaVAForConditionalGeneration,
    MGLLaVAProcessor,
    pool_object_features,
    random_full_size_encoders,
)

MiB = 2**20


class PeakRSS:
    """Peak resident-memory increase (bytes) over a ``with`` block, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.process = interval, psutil.Process()
        self.peak_increase = 0

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = self.process.memory_info().rss
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.peak_increase = self.peak - self.baseline


class PeakCUDA:
    """Peak increase of ``torch.cuda.max_memory_allocated`` (bytes) over a ``with`` block."""

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.peak_increase = torch.cuda.max_memory_allocated() - self.baseline


def peak_memory(device: torch.device) -> PeakRSS | PeakCUDA:
    return PeakCUDA() if device.type == "cuda" else PeakRSS()


Model = MGLLaVAForConditionalGeneration


def build_tiny(root: Path) -> tuple[Model, MGLLaVAProcessor]:
    from mgllava.config import load_config
    from mgllava.shapes.world import generate_world
    from mgllava.shapes.zoo import build_zoo

    generate_world(root / "world", n_images=24, seed=0, progress=False)
    build_zoo(root / "zoo", root / "world", 256, 112, 512)
    config = load_config("tiny", overrides=[f"work_dir={root}"]).model
    return Model.from_config(config), MGLLaVAProcessor.from_config(config)


def build_full_vision(tiny: Model, tiny_processor: MGLLaVAProcessor, llm_width: int) -> tuple[Model, MGLLaVAProcessor]:
    """Full-size encoders (random weights) around a small Llama that uses the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    low_res_encoder, high_res_encoder = random_full_size_encoders()
    tokenizer = tiny_processor.tokenizer
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=llm_width,
            intermediate_size=4 * llm_width,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=2048,
        )
    )
    processor = MGLLaVAProcessor(
        tokenizer,
        tiny.config.template,
        768,
        tiny_processor.image_mean,
        tiny_processor.image_std,
        max_text_length=2048 - 576,
        image_seq_length=576,
    )
    config = MGLLaVAConfig(
        text_config=llm.config, vision_config=low_res_encoder.clip.config, template=tiny.config.template,
        high_res=768, low_res=336, roi_output=56, max_length=2048, object_features=tiny.config.object_features,
    )
    return Model(config, llm, low_res_encoder, high_res_encoder), processor


def random_boxes(n: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """n boxes (n, 4) inside a side x side frame, each at least a quarter of the side wide."""
    xy = torch.rand(n, 2, generator=generator) * side * 0.6
    wh = (0.25 + torch.rand(n, 2, generator=generator) * 0.15) * side
    return torch.cat([xy, xy + wh], dim=1)


def make_batch(processor: MGLLaVAProcessor, batch_size: int, n_boxes: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    side = processor.high_res
    image = Image.new("RGB", (side, side))
    records = []
    for _ in range(batch_size):
        record = processor(
            [("human", "<image>\nDescribe the image."), ("gpt", "A few shapes on a plain background.")],
            [image],
            [Boxes(random_boxes(n_boxes, side, generator))],
        )
        record["pixel_values"] = torch.randn(1, 3, side, side, generator=generator)
        records.append(record)
    return processor.collate(records)


def time_step(model: Model, batch: dict, reps: int) -> tuple[float, int]:
    """Median seconds per sample of forward + backward, and the peak memory increase of one step."""
    model.set_stage("pretrain")
    model.train()
    times, peak = [], 0
    for _ in range(reps + 1):  # the first step warms up
        model.zero_grad(set_to_none=True)
        with peak_memory(model.device) as memory:
            start = time.perf_counter()
            model(**batch, loss_only=True).loss.backward()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = max(peak, memory.peak_increase)
    per_sample = sorted(times[1:])[len(times[1:]) // 2] / len(batch["input_ids"])
    return per_sample, peak // len(batch["input_ids"])


def object_feature_memory(model: Model, n_boxes: int, reps: int) -> dict:
    side, roi = model.config.high_res, model.config.roi_output
    pixel_values = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1)).to(model.device)
    boxes = [random_boxes(n_boxes, side, torch.Generator().manual_seed(2))]
    with torch.no_grad():
        stage_maps = model.high_res_encoder(pixel_values)
    channels = [m.shape[1] for m in stage_maps]
    stage1 = stage_maps[0].shape[-1]
    bytes_per = stage_maps[0].element_size()
    # direct: stages 2-4 resized to the stage-1 grid (C_total - C_1 channels) coexist with their
    # concatenation (C_total), then the concatenation with the (K, C_total, R, R) RoIAlign output
    c_total, c_rest = sum(channels), sum(channels[1:])
    direct_bytes = bytes_per * max(
        (c_rest + c_total) * stage1**2, c_total * stage1**2 + n_boxes * c_total * roi**2
    )
    # lean: one stage's (K, C_s, R, R) RoIAlign output at a time
    lean_bytes = bytes_per * n_boxes * max(channels) * roi**2
    measured = {}
    for method in ("lean", "direct", "lean", "direct")[: 2 * max(1, min(reps, 2))]:
        with torch.no_grad(), peak_memory(model.device) as memory:
            pool_object_features(stage_maps, boxes, side, roi, method)
        measured[method] = max(measured.get(method, 0), memory.peak_increase)
    print(f"\nobject features at {side}px, {n_boxes} boxes, channels {channels}, RoIAlign {roi}x{roi}:")
    print(
        f"  analytic peak  direct {direct_bytes / MiB:8.1f} MiB   lean {lean_bytes / MiB:8.1f} MiB   "
        f"ratio direct/lean {direct_bytes / lean_bytes:5.1f}x"
    )
    print(
        f"  measured {'CUDA' if model.device.type == 'cuda' else 'RSS '}  direct {measured['direct'] / MiB:8.1f} MiB   lean {measured['lean'] / MiB:8.1f} MiB   "
        f"ratio direct/lean {measured['direct'] / max(measured['lean'], 1):5.1f}x"
    )
    return {"analytic_mib": {"direct": direct_bytes / MiB, "lean": lean_bytes / MiB},
            "measured_mib": {k: v / MiB for k, v in measured.items()}}


def report(name: str, model: Model, batch: dict, reps: int) -> dict:
    seconds, peak = time_step(model, batch, reps)
    tokens = batch["attention_mask"].sum(1).tolist()
    print(
        f"{name:<12} forward+backward {seconds:7.3f} s/sample   "
        f"peak {'CUDA' if model.device.type == 'cuda' else 'RSS'} increase {peak / MiB:8.1f} MiB/sample   "
        f"sequence lengths {tokens}"
    )
    return {"s_per_sample": seconds, "peak_mib_per_sample": peak / MiB, "sequence_lengths": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--reps", type=int, default=1, help="timed steps after one warm-up step (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="samples per step (default 1)")
    parser.add_argument("--boxes", type=int, default=3, help="boxes per image (default 3)")
    parser.add_argument(
        "--llm-width", type=int, default=256, help="hidden size of the small LLM at full size"
    )
    parser.add_argument("--skip-full", action="store_true", help="only the tiny preset")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (fp32 on the GPU)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {name}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny, tiny_processor = build_tiny(Path(tmp))
        tiny = tiny.to(device)
        figures = {"benchmark": "model_step", "device": name, "batch": args.batch, "boxes": args.boxes}
        figures["tiny"] = report("tiny", tiny, make_batch(tiny_processor, args.batch, args.boxes), args.reps)
        print(tiny.trainable_summary())
        if not args.skip_full:
            full, processor = build_full_vision(tiny, tiny_processor, args.llm_width)
            full = full.to(device)
            figures["full_vision"] = report("full vision", full, make_batch(processor, args.batch, args.boxes), args.reps)
            print(full.trainable_summary())
            figures["object_features"] = object_feature_memory(full, args.boxes, args.reps)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
