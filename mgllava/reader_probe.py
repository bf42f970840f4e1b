"""Can this LLM learn to read object tokens? The language side of "it learns", measured alone.

MG-LLaVA answers "Is there a red circle in the image?" from one token per object box.
That needs two things: vision features that tell the objects apart (the tiny towers'
held-out figures are in ``zoo.json``), and an LLM that can look a (colour, shape) pair up
among the object tokens and answer yes or no. This probe measures the second on its own.

Each object token is an *ideal* feature, one-hot colour and one-hot shape (the world's
annotations, no pixels), mapped by a trainable two-layer MLP to the LLM width and spliced
where ``<image>`` stands with the model's own splice
(:func:`mgllava.model.splice.prepare_inputs_labels_for_multimodal`). The LLM and the MLP
are trained together on the world's POPE questions ("random", "popular" and "adversarial"
negatives, half of the questions "yes"), in the chat template and with the short-answer
post-prompt that lmms-eval's POPE uses, about scenes sampled without rendering. Held-out
accuracy (yes/no by the answer token's logits) is reported as training goes.

If the LLM cannot learn this with perfect features, no vision tower will make the full
model learn it either.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeItem:
    objects: list[tuple[int, int]]  # (colour index, shape index) of every object
    question: str  # in the instruct format: question, newline, short-answer post-prompt
    answer: str  # "yes" or "no"


def sample_items(rng: random.Random, n: int) -> list[ProbeItem]:
    """``n`` existence questions about fresh scenes, half "yes", negatives after all three POPE strategies."""
    from mgllava.world import questions as q
    from mgllava.world.generate import _annotation
    from mgllava.world.render import COLORS, SHAPES, sample_scene

    items = []
    for index in range(n):
        ann = _annotation(f"probe/{index}.png", sample_scene(rng, with_text=False))
        qa = q.existence(rng, ann, present=index % 2 == 0, strategy=rng.choice(q.POPE_STRATEGIES))
        objects = [(COLORS.index(o["color"]), SHAPES.index(o["shape"])) for o in ann["objects"]]
        items.append(ProbeItem(objects, f"{qa.question}\n{q.SHORT_ANSWER_PROMPT}", qa.answer))
    return items


def ideal_features(objects: list[tuple[int, int]]):
    """(K, n_colours + n_shapes): one-hot colour, then one-hot shape, per object."""
    import torch

    from mgllava.world.render import COLORS, SHAPES

    features = torch.zeros(len(objects), len(COLORS) + len(SHAPES))
    for row, (colour, shape) in enumerate(objects):
        features[row, colour] = 1.0
        features[row, len(COLORS) + shape] = 1.0
    return features


class ReaderProbe:
    """The LLM plus the object-token MLP, and batches of :class:`ProbeItem` in its chat template."""

    def __init__(self, llm_path: str | Path, template: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mgllava.model.processing_mgllava import MGLLaVAProcessor
        from mgllava.model.projector import MLPProjector
        from mgllava.world.render import COLORS, SHAPES

        tokenizer = AutoTokenizer.from_pretrained(llm_path)
        self.llm = AutoModelForCausalLM.from_pretrained(llm_path)
        width = self.llm.get_input_embeddings().embedding_dim
        self.object_mlp = MLPProjector(len(COLORS) + len(SHAPES), width)
        # only the text side of the processor is used: no images go through it
        self.processor = MGLLaVAProcessor(
            tokenizer, template, high_res=1, image_mean=(0.0,), image_std=(1.0,), max_text_length=4096
        )
        self.answer_ids = {a: self._answer_token(a) for a in ("yes", "no")}

    def _answer_token(self, answer: str) -> int:
        """The first label token that differs between a "yes" and a "no" conversation."""
        ids, labels = self.processor.tokenize_conversation([("human", "?"), ("gpt", answer)])
        return int(ids[labels != -100][0]) if len(ids[labels != -100]) else -1

    def parameters(self):
        return [*self.llm.parameters(), *self.object_mlp.parameters()]

    def batch(self, items: list[ProbeItem]) -> dict:
        """Spliced ``inputs_embeds``, masks, labels (B, T), and where each answer token sits."""
        import torch

        from mgllava.model.splice import prepare_inputs_labels_for_multimodal
        from mgllava.templates import IMAGE_PLACEHOLDER

        rows = [
            self.processor.tokenize_conversation(
                [("human", f"{IMAGE_PLACEHOLDER}\n{item.question}"), ("gpt", item.answer)]
            )
            for item in items
        ]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.processor.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)], labels[row, : len(ids)], attention_mask[row, : len(ids)] = (
                ids,
                row_labels,
                1,
            )
        object_tokens = [self.object_mlp(ideal_features(item.objects)) for item in items]  # B x (K_i, D)
        no_image_tokens = [tokens[:0] for tokens in object_tokens]  # the probe has object tokens only
        inputs = prepare_inputs_labels_for_multimodal(
            input_ids, attention_mask, labels, self.llm.get_input_embeddings(), no_image_tokens, object_tokens
        )
        # logits at t predict token t + 1: the answer token is the first labelled one
        answer_at = (inputs.labels != -100).int().argmax(dim=1) - 1  # (B,)
        return {"inputs": inputs, "answer_at": answer_at}

    def loss(self, items: list[ProbeItem]):
        inputs = self.batch(items)["inputs"]
        return self.llm(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            labels=inputs.labels,
        ).loss

    def accuracy(self, items: list[ProbeItem], batch_size: int = 64) -> float:
        """Share of ``items`` where the right answer's token outscores the other's."""
        import torch

        correct = 0
        self.llm.eval()
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                batch = self.batch(chunk)
                inputs = batch["inputs"]
                logits = self.llm(
                    inputs_embeds=inputs.inputs_embeds,
                    attention_mask=inputs.attention_mask,
                    position_ids=inputs.position_ids,
                ).logits  # (B, T, V)
                at = logits[torch.arange(len(chunk)), batch["answer_at"]]  # (B, V)
                says_yes = at[:, self.answer_ids["yes"]] > at[:, self.answer_ids["no"]]
                correct += sum(bool(y) == (item.answer == "yes") for y, item in zip(says_yes, chunk))
        self.llm.train()
        return correct / len(items)


def probe_reader(
    llm_path: str | Path,
    template: str = "vicuna_v1",
    steps: int = 1500,
    lr: float = 1e-3,
    batch_size: int = 16,
    n_held_out: int = 256,
    evaluations: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train the LLM and the object MLP for ``steps`` on fresh questions; return
    ``[{"step", "loss", "accuracy"}, ...]``, ``evaluations`` points plus step 0."""
    import torch
    from tqdm import tqdm

    from mgllava.tower_pretraining import fit

    torch.manual_seed(seed)
    probe = ReaderProbe(llm_path, template)
    if -1 in probe.answer_ids.values() or len(set(probe.answer_ids.values())) < 2:
        raise ValueError(
            f"{llm_path}: 'yes' and 'no' do not start with different tokens in template {template!r}"
        )
    held_out = sample_items(random.Random(f"{seed}/held-out"), n_held_out)
    train_rng = random.Random(f"{seed}/train")
    every = max(1, steps // evaluations)
    history = [{"step": 0, "loss": None, "accuracy": probe.accuracy(held_out)}]
    bar = tqdm(total=steps, desc="reader probe", disable=not progress)

    def loss_of_step(step: int):
        loss = probe.loss(sample_items(train_rng, batch_size))
        bar.update()
        if (step + 1) % every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": loss.item(), "accuracy": probe.accuracy(held_out)})
            bar.set_postfix(loss=f"{loss.item():.3f}", held_out=f"{history[-1]['accuracy']:.3f}")
            log.info(
                "step %d: loss %.3f, held-out accuracy %.3f", step + 1, loss.item(), history[-1]["accuracy"]
            )
        return loss

    probe.llm.train()
    fit(probe.parameters(), steps, lr, loss_of_step, weight_decay=0.0)
    bar.close()
    return history


def register_cli(subparsers) -> None:
    from mgllava.cli import add_config_args

    parser = subparsers.add_parser(
        "probe-reader",
        help="can the LLM learn to answer existence questions from ideal object tokens?",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument("--llm", help="LLM directory (default: the preset's model.llm.path)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, one-cycle (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per step (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from mgllava.cli import config_from_args

    config = config_from_args(args)
    history = probe_reader(
        args.llm or config.model.llm.path,
        template=config.model.llm.template,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    for point in history:
        print(json.dumps(point))
    return 0
