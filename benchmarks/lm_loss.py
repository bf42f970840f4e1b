"""The training loss from labelled positions only vs transformers' loss over the full logits.

Training (``model(..., loss_only=True)``, :func:`mgllava.model.modeling_mgllava.next_token_loss`)
projects to the vocabulary only the hidden states that predict a label; transformers' causal-LM loss
builds the (B, T, vocab) logits of the whole batch first. With Llama-3's vocabulary (128,256) those
logits, their float32 copy for the loss and their gradient are the largest tensors of a step.

Both losses run forward + backward on the same random Llama (``--hidden``, ``--layers``, ``--vocab``)
and batch (``--batch`` rows of ``--seq`` tokens, the last ``--labelled`` share of each row with a
label, as an answer after a prompt and image). Reported for each: seconds per forward + backward
(median of ``--repeats``) and the peak memory increase over one (on a CPU the resident memory sampled
by a thread, on a GPU ``torch.cuda.max_memory_allocated``); then the ratios full / labelled. The
losses must agree. The last line is one JSON object with the figures.

    python benchmarks/lm_loss.py [--vocab 128256] [--hidden 512] [--layers 2] [--batch 4] [--seq 1024]
        [--labelled 0.3] [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from model_step import PeakRSS
from transformers import LlamaConfig, LlamaForCausalLM

from mgllava.model.modeling_mgllava import next_token_loss
from mgllava.model.processing_mgllava import IGNORE_INDEX


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama-3: 128256, Vicuna: 32000)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--labelled", type=float, default=0.3, help="share of each row's positions with a label")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.seq)
    llm = LlamaForCausalLM(config).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).train()
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    labels = input_ids.clone()
    labels[:, : round(args.seq * (1 - args.labelled))] = IGNORE_INDEX  # the prompt: no loss

    losses = {
        "full_logits": lambda: llm(input_ids=input_ids, labels=labels).loss,
        "labelled_only": lambda: next_token_loss(llm, labels, input_ids=input_ids),
    }
    results = {}
    for name, loss_of in losses.items():
        loss_of().backward()  # warm-up
        llm.zero_grad(set_to_none=True)
        seconds, peaks = [], []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                baseline = torch.cuda.memory_allocated()
            with PeakRSS() as rss:
                started = time.perf_counter()
                loss = loss_of()
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - started)
            peaks.append(torch.cuda.max_memory_allocated() - baseline if device.type == "cuda" else rss.peak_increase)
            llm.zero_grad(set_to_none=True)
        results[name] = {"loss": loss.item(), "s": statistics.median(seconds), "peak_mib": max(peaks) / 2**20}
        print(f"{name}: loss {loss.item():.4f}, {results[name]['s']:.3f} s per forward + backward, "
              f"peak memory increase {results[name]['peak_mib']:.0f} MiB", flush=True)

    full, labelled = results["full_logits"], results["labelled_only"]
    if abs(full["loss"] - labelled["loss"]) > 1e-3 * abs(full["loss"]):
        raise SystemExit(f"the two losses disagree: {full['loss']} vs {labelled['loss']}")
    summary = {
        "benchmark": "lm_loss", **{key: getattr(args, key) for key in ("vocab", "hidden", "layers", "batch", "seq",
                                                                       "labelled", "device")},
        "full_logits_mib": round(args.batch * args.seq * args.vocab * 4 / 2**20),  # one float32 (B, T, V) tensor
        "results": results,
        "memory_full_over_labelled": round(full["peak_mib"] / labelled["peak_mib"], 3),
        "time_full_over_labelled": round(full["s"] / labelled["s"], 3),
    }
    print(f"full logits / labelled only: memory {summary['memory_full_over_labelled']}x, "
          f"time {summary['time_full_over_labelled']}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
