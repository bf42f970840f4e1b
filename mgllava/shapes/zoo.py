"""The tiny model zoo: small checkpoints in the public full-size layouts.

``mgllava zoo --out DIR`` writes three directories that the model code loads
with exactly the calls it uses for the real checkpoints:

- ``llm/``: a tiny Llama-architecture ``LlamaForCausalLM`` and a byte-level BPE
  tokenizer, both trained on the shapes world's text (the LLM as a language model, on the
  training conversations with each image replaced by its caption: the stand-in for a real
  LLM's text pretraining; it has never seen these images, and how well it answers questions
  about a scene told in words is measured, :func:`caption_reading`), saved with ``save_pretrained``
  (loaded by ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``), as
  Vicuna, Llama-3, Phi-3 and Yi are;
- ``clip/``: a tiny ``CLIPVisionModel`` with its ``CLIPImageProcessor``, the
  layout of ``openai/clip-vit-large-patch14-336``;
- ``convnext/``: a tiny open_clip ConvNeXt CLIP (timm ``convnext_atto`` trunk)
  as ``open_clip_config.json`` + ``open_clip_model.safetensors``, the layout of
  the hub's ``laion/CLIP-convnext_large_d_320.*`` repositories, loaded by
  ``open_clip.create_model("local-dir:" + path)``.

Both vision towers are pretrained before they are saved (the stand-in for CLIP's own
pretraining, :mod:`mgllava.shapes.towers`): the ConvNeXt names rendered objects, the
CLIP ViT is distilled from it. Sizes follow the ``tiny`` preset: CLIP at ``low_res`` with
patch 14, ConvNeXt at ``high_res``. Everything is seeded, so the zoo is reproducible.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from mgllava.config import ZooConfig
from mgllava.templates import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _world_conversations(world_dir: Path, describe_images: bool) -> list[list[tuple[str, str]]]:
    """The world's conversations (pretraining captions, then instructions) as ``[(role, text), ...]``.

    With ``describe_images`` each ``<image>`` placeholder is replaced by the image's caption
    (from ``pretrain.json``): the scene is told in words instead of shown, so that a language
    model pretrained on that text could learn to answer questions about a scene described to
    it, the reading skill a real LLM brings (:func:`caption_reading` measures it).
    """
    pretrain = json.loads((world_dir / "pretrain.json").read_text())
    # the first instruction conversation about each image only: the text pretraining does not
    # grow with the world's conversations_per_image
    first_per_image: dict[str, dict] = {}
    for record in json.loads((world_dir / "instruct.json").read_text()):
        first_per_image.setdefault(record["image"], record)
    records = pretrain + list(first_per_image.values())
    conversations = [[(t["from"], t["value"]) for t in r["conversations"]] for r in records]
    if describe_images:
        captions = _captions(world_dir)
        conversations = [
            _described(turns, captions[record["image"]])
            for record, turns in zip(records, conversations)
            if record.get("image") in captions
        ]
    return conversations


def _captions(world_dir: Path) -> dict[str, str]:
    """Image key -> its caption, from the world's ``pretrain.json``."""
    return {r["image"]: r["conversations"][1]["value"] for r in json.loads((world_dir / "pretrain.json").read_text())}


def _described(turns: list[tuple[str, str]], caption: str) -> list[tuple[str, str]]:
    """A conversation with its ``<image>`` placeholder replaced by the image's caption."""
    return [(role, text.replace(IMAGE_PLACEHOLDER, caption)) for role, text in turns]


def _world_texts(world_dir: Path, template_names: list[str] | None = None, describe_images: bool = False) -> Iterator[str]:
    """The world's conversations rendered in the named chat templates (all by default), and its numbers."""
    from mgllava.templates import TEMPLATES

    templates = [TEMPLATES[name] for name in template_names or TEMPLATES]
    for index, turns in enumerate(_world_conversations(world_dir, describe_images)):
        yield "".join(s.text for s in templates[index % len(templates)].render(turns))
    for line in (world_dir / "annotations.jsonl").read_text().splitlines():
        if line.strip() and json.loads(line).get("text"):
            yield json.loads(line)["text"]


TOKENIZER_TEMPLATES = ("vicuna_v1", "phi3", "llama3", "chatml")
"""The chat templates the tokenizer's training text is rendered in: a fixed list, so the kit's tokenizer
(and the tiny LLM trained on it) stays the same when templates are added to the registry."""


def train_tokenizer(world_dir: Path, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on the world's text, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_world_texts(world_dir, list(TOKENIZER_TEMPLATES)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=2048, **SPECIAL_TOKENS)


def build_llm(
    out: Path,
    world_dir: Path,
    max_length: int,
    template: str = "vicuna_v1",
    layers: int = 4,
    instruct_steps: int = 0,
    option_share: float = 0.0,
    lookup_share: float = 0.0,
    instruct_precision: str = "fp32",
):
    """Train the tokenizer and the tiny LLM (``layers`` decoder layers, 128 wide) on the world's
    text, save both; return (model, what was measured).

    Language-model pretraining on the world's text (:func:`pretrain_on_text`), then ``instruct_steps``
    steps of instruction tuning on its questions told in words, ``option_share`` and ``lookup_share``
    of the rows being four-option drills (:func:`instruction_tune_on_text`, in ``instruct_precision``);
    :func:`caption_reading` is measured after each. The report: ``{"text_loss": [first, last],
    "instruct_loss": [first, last] or None, "caption_reading_pretrained": ..., "caption_reading": ...}``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(world_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    texts = list(_world_texts(world_dir, [template], describe_images=True))
    text_losses = pretrain_on_text(model, tokenizer, texts)
    log.info("tiny LLM text pretraining: loss %.3f -> %.3f", text_losses[0], text_losses[-1])
    report = {"text_loss": [text_losses[0], text_losses[-1]], "instruct_loss": None,
              "caption_reading_pretrained": caption_reading(model, tokenizer, world_dir, template)}
    _log_reading("after text pretraining", report["caption_reading_pretrained"])
    report["caption_reading"] = report["caption_reading_pretrained"]
    if instruct_steps:
        losses = instruction_tune_on_text(model, tokenizer, world_dir, template, instruct_steps,
                                          option_share=option_share, lookup_share=lookup_share,
                                          precision=instruct_precision)
        log.info("tiny LLM instruction tuning on text: answer loss %.3f -> %.3f", losses[0], losses[-1])
        report["instruct_loss"] = [losses[0], losses[-1]]
        report["caption_reading"] = caption_reading(model, tokenizer, world_dir, template)
        _log_reading("after instruction tuning", report["caption_reading"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, report


def _log_reading(when: str, reading: dict) -> None:
    log.info("tiny LLM reading a caption %s: existence %.3f, choose %.3f (chance 0.5), four options %.3f (0.25)",
             when, reading["existence_acc"], reading["choice_acc"], reading["mc_acc"])


def pretrain_on_text(
    model, tokenizer, texts: list[str], epochs: int = 3, block: int = 128, batch_size: int = 16
) -> list[float]:
    """Language-model pretraining (``epochs`` passes) of the tiny LLM on the world's text (no images).

    The stand-in for the text pretraining every real LLM of the recipe has had: the
    model learns the chat format and the words of the world, not what any image shows.
    Texts are packed into ``block``-token rows (no padding). Returns each step's loss.
    """
    import torch

    from mgllava.shapes.towers import fit

    stream = []
    for ids in _encoder(tokenizer)(texts):
        stream += [tokenizer.bos_token_id, *ids]
    n_blocks = len(stream) // block
    blocks = torch.tensor(stream[: n_blocks * block]).view(n_blocks, block)  # (n_blocks, block)
    generator = torch.Generator().manual_seed(0)
    blocks = torch.cat([blocks[torch.randperm(n_blocks, generator=generator)] for _ in range(epochs)])
    steps = max(1, len(blocks) // batch_size)

    def loss_of_step(step: int):
        input_ids = blocks[step * batch_size : (step + 1) * batch_size]
        return model(input_ids=input_ids, labels=input_ids).loss

    model.train()
    losses = fit(model.parameters(), steps, 3e-3, loss_of_step, weight_decay=0.0)
    model.eval()
    return losses


def instruction_tune_on_text(
    model,
    tokenizer,
    world_dir: Path,
    template: str,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 16,
    option_share: float = 0.0,
    lookup_share: float = 0.0,
    precision: str = "fp32",
) -> list[float]:
    """Instruction tuning (``steps`` steps) of the tiny LLM on the world's questions told in words.

    Every training conversation of ``instruct.json`` with its image replaced by the caption, the
    loss on the assistant's answers only, as the finetune puts it: the stand-in for the
    instruction tuning a chat LLM such as Vicuna has had.

    ``option_share`` of the rows are four-option questions about a training scene told in words
    (:func:`~mgllava.shapes.world.questions.four_option_question`) and ``lookup_share`` bare letter
    lookups (:func:`~mgllava.shapes.world.questions.letter_lookup`), fresh ones each step, so that
    the LLM binds an answer to its option's letter (why: docs/findings.md). ``precision`` ``bf16``: the
    matrix products in bf16 (``torch.autocast``) and eager attention, as ``shapes.zoo.llm_instruct_precision``
    says; the weights and AdamW's state stay fp32. Returns each step's loss.
    """
    import random
    from collections import Counter

    import torch

    from mgllava.model.processing_mgllava import IGNORE_INDEX
    from mgllava.shapes.towers import fit
    from mgllava.shapes.world import questions as q
    from mgllava.shapes.world.generate import load_annotations
    from mgllava.templates import get_template

    chat, captions, encode = get_template(template), _captions(world_dir), _encoder(tokenizer)

    def tokenized(turns: list[tuple[str, str]]) -> dict[str, list[int]]:
        input_ids, labels = chat.tokenize(encode, turns, tokenizer.bos_token_id, ignore_index=IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}

    conversations = [
        tokenized(_described([(t["from"], t["value"]) for t in record["conversations"]], captions[record["image"]]))
        for record in json.loads((world_dir / "instruct.json").read_text())
    ]
    scenes = load_annotations(world_dir, "train")
    rng = random.Random(0)

    def row(kind: str) -> dict[str, list[int]]:
        if kind == "lookup":
            prompt, letter = q.letter_lookup(rng)
            return tokenized([("human", prompt), ("gpt", letter)])
        if kind == "option":
            while (mc := q.four_option_question(rng, scene := rng.choice(scenes))) is None:
                pass
            return tokenized([("human", _told(scene, mc[0])), ("gpt", mc[1])])
        return rng.choice(conversations)

    kinds = ("lookup", "option", "conversation")
    shares = (lookup_share, option_share, max(0.0, 1.0 - lookup_share - option_share))

    bf16 = precision == "bf16"

    def loss_of_step(step: int):
        drawn = Counter(rng.choices(kinds, shares, k=batch_size))
        groups = [[row(kind) for _ in range(drawn[kind])] for kind in kinds if drawn[kind]]
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            return answer_loss(model, groups, tokenizer.pad_token_id)

    attention = model.config._attn_implementation
    model.set_attn_implementation("eager" if bf16 else attention)
    model.train()
    losses = fit(model.parameters(), steps, lr, loss_of_step, weight_decay=0.0, name="tiny LLM instruction tuning")
    model.eval()
    model.set_attn_implementation(attention)
    return losses


def answer_loss(model, groups: list[list[dict[str, list[int]]]], pad_token_id: int):
    """The loss over every answer token of ``groups`` of rows (``input_ids``, ``labels``), each
    group padded on its own: the loss of all the rows padded as one batch, without padding the
    short rows of one group to the longest of another. Right padding needs no attention mask (as
    in training's :class:`~mgllava.train.data.Collate`), so SDPA runs its causal kernel. Lengths are
    rounded up to a multiple of 32: on a CPU, every new sequence length costs new matrix-product
    kernels (docs/results.md, session 14)."""
    from mgllava.model.processing_mgllava import IGNORE_INDEX, pad_text

    losses, answer_tokens = [], []
    for rows in groups:
        batch = pad_text(rows, pad_token_id, padding_side="right", pad_to_multiple_of=32)  # (b, T) each
        del batch["attention_mask"]
        losses.append(model(**batch).loss)  # mean over the group's answer tokens
        answer_tokens.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))  # the model shifts labels by one
    return sum(loss * n for loss, n in zip(losses, answer_tokens)) / sum(answer_tokens)


def _told(ann: dict, question: str) -> str:
    """A question about a scene told in words: the scene's caption, then the question, as
    :func:`_described` puts an instruction conversation's first turn."""
    from mgllava.shapes.world import questions as q

    return f"{q.caption(ann)}\n{question}"


def _encoder(tokenizer):
    """``texts -> each text's token ids`` without special tokens, the ``encode`` of :meth:`ChatTemplate.tokenize`."""
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def caption_reading(model, tokenizer, world_dir: Path, template: str = "vicuna_v1", n: int = 200, seed: int = 0) -> dict:
    """How well the tiny LLM answers questions about a scene *told in words*.

    Held-out (benchmark split) scenes, each image replaced by its caption as in the text
    training: ``n`` existence questions (half "yes", POPE's three negative strategies), up to
    ``n`` "choose" questions ("Is the circle red or blue?") and ``n`` four-option questions worded
    as MMBench's (the correct letter cycling A-D). Each is scored by comparing the logits of the
    candidate answers' first tokens at the answer position (chance: 0.5, 0.5 and 0.25). A real
    LLM reads a description like this at once; the tiny one's figures say how much of that skill
    the stand-in brings to the finetune.
    """
    import random
    import re

    import torch

    from mgllava.shapes.world import questions as q
    from mgllava.shapes.world.generate import load_annotations
    from mgllava.templates import get_template

    annotations = load_annotations(world_dir, "bench")
    rng = random.Random(seed)
    chat = get_template(template)

    encode = _encoder(tokenizer)

    def picks(ann: dict, question: str, candidates: tuple[str, ...], answer: str) -> bool:
        ids, _ = chat.tokenize(encode, [("human", _told(ann, question))], tokenizer.bos_token_id,
                               add_generation_prompt=True)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # (V,)
        scores = [logits[encode(c)[0]].item() for c in candidates]
        return candidates[scores.index(max(scores))] == answer

    existence = choice = choices_asked = 0
    for index in range(n):
        ann = rng.choice(annotations)
        qa = q.existence(rng, ann, present=index % 2 == 0, strategy=rng.choice(q.POPE_STRATEGIES))
        existence += picks(ann, f"{qa.question}\n{q.SHORT_ANSWER_PROMPT}", ("yes", "no"), qa.answer)
        qa = q.choice(rng, ann)
        if qa is not None:
            colours = re.fullmatch(r"Is the \w+ (\w+) or (\w+)\?", qa.question).groups()
            choice += picks(ann, f"{qa.question}\n{q.SHORT_ANSWER_PROMPT}", colours, qa.answer)
            choices_asked += 1
    multiple_choice = mc_asked = 0
    while mc_asked < n:
        ann = rng.choice(annotations)
        mc = q.four_option_question(rng, ann, letter="ABCD"[mc_asked % 4])
        if mc is not None:
            multiple_choice += picks(ann, mc[0], tuple("ABCD"), mc[1])
            mc_asked += 1
    return {"existence_acc": existence / n, "choice_acc": choice / max(choices_asked, 1),
            "mc_acc": multiple_choice / n, "n": n}


def build_clip(out: Path, image_size: int):
    """A tiny ``CLIPVisionModel`` (random weights) saved in the Hugging Face layout."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        projection_dim=64,
    )
    model = CLIPVisionModel(config)
    save_clip(out, model, image_size)
    return model


def save_clip(out: Path, model, image_size: int) -> None:
    """``save_pretrained`` the model and its ``CLIPImageProcessor``."""
    from transformers import CLIPImageProcessor

    model.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out)


def convnext_open_clip_config(image_size: int) -> dict:
    """An open_clip hub config for a tiny ConvNeXt CLIP (``convnext_atto`` trunk; the text tower is unused)."""
    return {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {
                "timm_model_name": "convnext_atto",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "timm_drop": 0.0,
                "timm_drop_path": 0.0,
                "image_size": image_size,
            },
            "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }


def build_convnext(out: Path, image_size: int):
    """Write the open_clip hub layout, then build the model from it with the real loading code."""
    import open_clip

    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_model.safetensors").unlink(missing_ok=True)  # else open_clip loads the old weights
    (out / "open_clip_config.json").write_text(json.dumps(convnext_open_clip_config(image_size), indent=2))
    model = open_clip.create_model(LOCAL_DIR_PREFIX + str(out), pretrained=None)
    save_convnext(out, model)
    return model


def save_convnext(out: Path, model) -> None:
    """The open_clip model's weights as ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")


LOCAL_DIR_PREFIX = "local-dir:"


def _zoo_settings(world_dir: str | Path, high_res: int, low_res: int, max_length: int, recipe: ZooConfig) -> dict:
    return {"high_res": high_res, "low_res": low_res, "max_length": max_length, "world": str(Path(world_dir)),
            **recipe.model_dump()}


def zoo_is_built(out_dir: str | Path, world_dir: str | Path, high_res: int, low_res: int, max_length: int,
                 recipe: ZooConfig | None = None) -> bool:
    """True when ``out_dir`` holds a finished zoo (its ``zoo.json``) built with these settings."""
    marker = Path(out_dir) / "zoo.json"
    if not marker.exists():
        return False
    settings = _zoo_settings(world_dir, high_res, low_res, max_length, recipe or ZooConfig())
    return {k: v for k, v in json.loads(marker.read_text()).items() if k in settings} == settings


def build_zoo(
    out_dir: str | Path,
    world_dir: str | Path,
    high_res: int,
    low_res: int,
    max_length: int,
    recipe: ZooConfig | None = None,
) -> Path:
    """Build the tiny LLM, CLIP and ConvNeXt under ``out_dir``; skip if already complete.

    ``recipe`` (the configuration's ``zoo`` section; its defaults if None) sets how they are
    trained: the vision towers pretrained on ``tower_scenes`` rendered scenes for ``tower_epochs``
    epochs (:mod:`mgllava.shapes.towers`; 0 by default leaves them random), the LLM's depth
    and its instruction tuning on text (:func:`build_llm`; none by default). ``zoo.json`` records
    the settings and what was measured. The two parts are independent (:func:`build_zoo_llm`,
    :func:`build_zoo_towers`, each seeded), so they may also be built in two processes at once.
    """
    out_dir, world_dir = Path(out_dir), Path(world_dir)
    recipe = recipe or ZooConfig()
    if zoo_is_built(out_dir, world_dir, high_res, low_res, max_length, recipe):
        log.info("tiny zoo already built in %s (same settings): skipping", out_dir)
        return out_dir
    llm = build_zoo_llm(out_dir, world_dir, max_length, recipe)
    towers = build_zoo_towers(out_dir, high_res, low_res, recipe)
    write_zoo_record(out_dir, world_dir, high_res, low_res, max_length, recipe, llm, towers)
    return out_dir


def build_zoo_llm(out_dir: str | Path, world_dir: str | Path, max_length: int, recipe: ZooConfig) -> dict:
    """The zoo's tokenizer and LLM in ``out_dir/llm`` (:func:`build_llm`, seeded); what was measured."""
    import torch

    world_dir = Path(world_dir)
    if not (world_dir / "instruct.json").exists():
        raise FileNotFoundError(f"shapes world not found at {world_dir}: run `mgllava world` first")
    torch.manual_seed(0)
    _, report = build_llm(Path(out_dir) / "llm", world_dir, max_length, layers=recipe.llm_layers,
                          instruct_steps=recipe.llm_instruct_steps, option_share=recipe.llm_option_share,
                          lookup_share=recipe.llm_lookup_share, instruct_precision=recipe.llm_instruct_precision)
    return report


def build_zoo_towers(out_dir: str | Path, high_res: int, low_res: int, recipe: ZooConfig) -> dict:
    """The zoo's CLIP (``out_dir/clip``) and ConvNeXt (``out_dir/convnext``), seeded, pretrained
    (:func:`~mgllava.shapes.towers.pretrain_towers`); their held-out figures."""
    import torch

    from mgllava.shapes.towers import pretrain_towers

    out_dir = Path(out_dir)
    torch.manual_seed(0)
    clip = build_clip(out_dir / "clip", low_res)
    convnext = build_convnext(out_dir / "convnext", high_res)
    towers = pretrain_towers(clip, convnext.visual.trunk, high_res, low_res, n_scenes=recipe.tower_scenes,
                             epochs=recipe.tower_epochs, mean=CLIP_MEAN, std=CLIP_STD)
    save_clip(out_dir / "clip", clip, low_res)
    save_convnext(out_dir / "convnext", convnext)
    return towers


def write_zoo_record(out_dir: str | Path, world_dir: str | Path, high_res: int, low_res: int, max_length: int,
                     recipe: ZooConfig, llm: dict, towers: dict) -> None:
    """``zoo.json``, written last: the settings (what :func:`zoo_is_built` compares) and what was measured."""
    settings = _zoo_settings(world_dir, high_res, low_res, max_length, recipe)
    (Path(out_dir) / "zoo.json").write_text(json.dumps({**settings, "llm": llm, "towers": towers}, indent=2))
    log.info("tiny zoo written to %s", out_dir)


def register_cli(subparsers) -> None:
    from mgllava.cli import add_config_args

    parser = subparsers.add_parser(
        "zoo",
        help="build the tiny model zoo (LLM + tokenizer, CLIP ViT, open_clip ConvNeXt)",
        description="Build tiny checkpoints in the full-size public layouts (Hugging Face directories, "
        "an open_clip config + safetensors weights) for the tiny preset. The tokenizer is trained "
        "on the shapes world's text, so the world must exist.",
    )
    add_config_args(parser)
    parser.add_argument("--out", help="output directory (default: the zoo under the config's work_dir)")
    parser.add_argument("--world", help="shapes world directory (default: the config's shapes.world.dir)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mgllava.cli import UsageError, config_from_args
    from mgllava.shapes.world import read_manifest

    config = config_from_args(args)
    out = Path(args.out) if args.out else Path(config.model.llm.path).parent
    if config.shapes is None:
        raise UsageError("--preset", f"configuration '{config.preset}' has no shapes section (the demo kit's settings)")
    world = args.world or config.shapes.world.dir
    if read_manifest(world) is None:
        raise UsageError("--world", f"{world} is not a shapes world (no world.json): run `mgllava world` first")
    vision = config.model.vision
    build_zoo(out, world, high_res=vision.high_res, low_res=vision.low_res, max_length=config.model.max_length,
              recipe=config.shapes.zoo)
    print(f"zoo: {out} (llm/, clip/, convnext/)")
    return 0
