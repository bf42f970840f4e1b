"""Can this LLM learn to read object tokens? The language side of "it learns", measured alone.

MG-LLaVA answers "Is there a red circle in the image?" from one token per object box.
That needs two things: vision features that tell the objects apart (the tiny towers'
held-out figures are in ``zoo.json``), and an LLM that can look the (colour, shape) pair up
among the object tokens and answer yes or no. A pretrained LLM brings that in-context
skill. This probe (``python experiments/reader.py``) measures whether an LLM can learn it, with no pixels involved.

Each object token is an *ideal* feature: one-hot colour and one-hot shape, from the world's
annotations. A trainable two-layer MLP maps it to the LLM width, and the model's processor expands
``<image>`` into one object placeholder per object (no image tokens), where the tokens are scattered
as the model does (:meth:`mgllava.model.MGLLaVAForConditionalGeneration.embed_multimodal`). The LLM and the MLP are trained together on the world's POPE
questions about scenes sampled without rendering, in the chat template with lmms-eval's
short-answer post-prompt. The negatives follow the "random", "popular" and "adversarial"
strategies, and half of the questions are "yes". A share of the training questions
(``choice_share``) are "choose" questions instead ("Is the circle red or blue?"): their answer
is a word of the question, which teaches the answer position to look back at the question
across the post-prompt. Without them a small LLM stays at chance (docs/findings.md, "Why the
LLM did not read").

Held-out accuracy is measured on existence questions, by comparing the logits of the two
answer tokens. If an LLM cannot learn this from perfect features, no vision tower will make
the full model learn it.
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


def sample_items(rng: random.Random, n: int, choice_share: float = 0.0) -> list[ProbeItem]:
    """``n`` questions about fresh scenes: existence questions, half "yes", negatives after all
    three POPE strategies; about ``choice_share`` of them are "choose" questions instead ("Is the
    circle red or blue?", :func:`mgllava.shapes.world.questions.choice`)."""
    from mgllava.shapes.world import questions as q
    from mgllava.shapes.world.generate import _annotation
    from mgllava.shapes.world.render import COLORS, SHAPES, sample_scene

    items = []
    for index in range(n):
        ann = _annotation(f"probe/{index}.png", sample_scene(rng, with_text=False))
        qa = q.choice(rng, ann) if rng.random() < choice_share else None
        if qa is None:
            qa = q.existence(rng, ann, present=index % 2 == 0, strategy=rng.choice(q.POPE_STRATEGIES))
        objects = [(COLORS.index(o["color"]), SHAPES.index(o["shape"])) for o in ann["objects"]]
        items.append(ProbeItem(objects, f"{qa.question}\n{q.SHORT_ANSWER_PROMPT}", qa.answer))
    return items


def ideal_features(objects: list[tuple[int, int]]):
    """(K, n_colours + n_shapes): one-hot colour, then one-hot shape, per object."""
    import torch

    from mgllava.shapes.world.render import COLORS, SHAPES

    features = torch.zeros(len(objects), len(COLORS) + len(SHAPES))
    for row, (colour, shape) in enumerate(objects):
        features[row, colour] = 1.0
        features[row, len(COLORS) + shape] = 1.0
    return features


class ReaderProbe:
    """The LLM plus the object-token MLP, and batches of :class:`ProbeItem` in its chat template."""

    def __init__(self, llm, tokenizer, template: str, device: str = "cpu"):
        from mgllava.model.processing_mgllava import MGLLaVAProcessor
        from mgllava.model.projector import MLPProjector
        from mgllava.shapes.world.render import COLORS, SHAPES

        self.device = device
        self.llm = llm.to(device)
        width = self.llm.get_input_embeddings().embedding_dim
        self.object_mlp = MLPProjector(len(COLORS) + len(SHAPES), width).to(device)
        # only the text side of the processor is used: no images go through it
        self.processor = MGLLaVAProcessor(
            tokenizer, template, high_res=1, image_mean=(0.0,), image_std=(1.0,), max_text_length=4096,
            image_seq_length=0,
        )
        self.answer_ids = {a: self._answer_token(a) for a in ("yes", "no")}

    def _answer_token(self, answer: str) -> int:
        """The first label token of an assistant turn that answers ``answer`` (-1 if there is none)."""
        from mgllava.model import IGNORE_INDEX

        ids, labels = self.processor.tokenize_conversation([("human", "?"), ("gpt", answer)])
        answer_ids = ids[labels != IGNORE_INDEX]
        return int(answer_ids[0]) if len(answer_ids) else -1

    @classmethod
    def from_pretrained(cls, llm_path: str | Path, template: str, device: str = "cpu") -> ReaderProbe:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        llm = AutoModelForCausalLM.from_pretrained(llm_path)
        return cls(llm, AutoTokenizer.from_pretrained(llm_path), template, device)

    def _tokenize(self, item: ProbeItem):
        """``input_ids``, ``labels`` (T,) of one question and its answer in the chat template, ``<image>``
        expanded into one object placeholder per object."""
        from mgllava.templates import IMAGE_PLACEHOLDER

        ids, labels = self.processor.tokenize_conversation(
            [("human", f"{IMAGE_PLACEHOLDER}\n{item.question}"), ("gpt", item.answer)]
        )
        return self.processor.expand_placeholders(ids, labels, [len(item.objects)])

    def parameters(self):
        return [*self.llm.parameters(), *self.object_mlp.parameters()]

    def batch(self, items: list[ProbeItem]) -> dict:
        """Spliced ``inputs_embeds``, masks, labels (B, T), and where each answer's first token sits."""
        from types import SimpleNamespace

        import torch

        from mgllava.model import IGNORE_INDEX, OBJECT_TOKEN_INDEX

        rows = [self._tokenize(item) for item in items]
        padded = self.processor.collate(
            [
                {"input_ids": ids, "labels": labels, "pixel_values": torch.zeros(0), "boxes": []}
                for ids, labels in rows
            ]
        )  # right-padded (B, T); no images
        input_ids, attention_mask, labels = (
            padded[key].to(self.device) for key in ("input_ids", "attention_mask", "labels")
        )
        object_tokens = [
            self.object_mlp(ideal_features(item.objects).to(self.device)) for item in items
        ]  # B x (K_i, D)
        objects = input_ids == OBJECT_TOKEN_INDEX  # (B, T)
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(objects, 0))  # (B, T, D)
        embeds = embeds.masked_scatter(objects[..., None], torch.cat(object_tokens).to(embeds.dtype))
        inputs = SimpleNamespace(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=None, labels=labels)
        # logits at t predict token t + 1: the answer token is the first labelled one
        answer_at = (inputs.labels != IGNORE_INDEX).int().argmax(dim=1) - 1  # (B,)
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
                at = logits[torch.arange(len(chunk), device=logits.device), batch["answer_at"]]  # (B, V)
                says_yes = at[:, self.answer_ids["yes"]] > at[:, self.answer_ids["no"]]
                correct += sum(bool(y) == (item.answer == "yes") for y, item in zip(says_yes, chunk))
        self.llm.train()
        return correct / len(items)


def train_reader(
    reader: ReaderProbe,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 16,
    choice_share: float = 0.3,
    n_held_out: int = 256,
    evaluations: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train the reader's LLM and object MLP for ``steps`` on fresh questions, ``choice_share`` of
    them "choose" questions; return ``[{"step", "loss", "accuracy"}, ...]`` (held-out existence
    questions), ``evaluations`` points plus step 0."""
    import torch
    from tqdm import tqdm

    from mgllava.shapes.towers import fit

    if -1 in reader.answer_ids.values() or len(set(reader.answer_ids.values())) < 2:
        raise ValueError("'yes' and 'no' do not start with different tokens in this LLM's chat template")
    torch.manual_seed(seed)
    held_out = sample_items(random.Random(f"{seed}/held-out"), n_held_out)
    train_rng = random.Random(f"{seed}/train")
    every = max(1, steps // evaluations)
    history = [{"step": 0, "loss": None, "accuracy": reader.accuracy(held_out)}]
    bar = tqdm(total=steps, desc="object reading", disable=not progress)

    def loss_of_step(step: int):
        loss = reader.loss(sample_items(train_rng, batch_size, choice_share))
        bar.update()
        if (step + 1) % every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": loss.item(), "accuracy": reader.accuracy(held_out)})
            bar.set_postfix(loss=f"{loss.item():.3f}", held_out=f"{history[-1]['accuracy']:.3f}")
            log.info(
                "object reading, step %d: loss %.3f, held-out accuracy %.3f",
                step + 1,
                loss.item(),
                history[-1]["accuracy"],
            )
        return loss

    reader.llm.train()
    fit(reader.parameters(), steps, lr, loss_of_step, weight_decay=0.0)
    reader.llm.eval()
    bar.close()
    return history


def probe_reader(
    llm_path: str | Path, template: str = "vicuna_v1", device: str = "cpu", seed: int = 0, **train_args
) -> list[dict]:
    """:func:`train_reader` on a copy of the LLM at ``llm_path`` (nothing is saved). ``seed`` also
    fixes the object MLP's initial weights."""
    import torch

    torch.manual_seed(seed)
    return train_reader(ReaderProbe.from_pretrained(llm_path, template, device), seed=seed, **train_args)


def build_parser() -> argparse.ArgumentParser:
    from mgllava.cli import add_config_args

    parser = argparse.ArgumentParser(
        prog="python experiments/reader.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument("--llm", help="LLM directory (default: the preset's model.llm.path)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, one-cycle (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per step (default 16)")
    parser.add_argument(
        "--choice-share",
        type=float,
        default=0.3,
        help='share of training questions that are "choose" questions, "Is the circle red or blue?" '
        "(default 0.3; 0: existence questions only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    import json

    from mgllava.cli import config_from_args

    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    llm = Path(args.llm or config.model.llm.path)
    if not llm.is_dir():
        raise SystemExit(
            f"reader probe: no LLM directory at {llm}: run `mgllava zoo` or pass --llm DIR"
        )
    history = probe_reader(
        llm,
        template=config.model.llm.template,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        choice_share=args.choice_share,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    for point in history:
        print(json.dumps(point))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
