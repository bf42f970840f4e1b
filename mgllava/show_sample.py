"""``mgllava show-sample``: what the model sees for one training record, without loading weights.

For record ``--index`` of the stage's corpus (its position in the JSON list) it prints the
text as the chat template renders it, with the ``<image>`` position marked by the image and
object tokens spliced there, the loss-bearing tokens between ``⟦`` and ``⟧``, the token counts,
and the boxes after filtering and mapping, as training builds them (the stage's tokenizer and
processor, the record's image and its box-table row). ``--tokens`` adds one line per text token.
A record that training rejects or skips is named with the reason (exit 1).
"""

from __future__ import annotations

import argparse

LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"


def register_cli(subparsers) -> None:
    from mgllava.cli import add_config_args

    parser = subparsers.add_parser(
        "show-sample",
        help="print what the model sees for one training record (text, loss, image and object tokens, boxes)",
        description="Render one record of the pretrain or finetune corpus as training does: the chat "
        "template's text with the <image> position and its image and object tokens marked, the tokens "
        "that carry loss, the token counts, and the record's boxes after filtering and mapping. Loads the "
        "tokenizer and the image processor only, no weights: a quick check of a new corpus or template.",
    )
    add_config_args(parser)
    parser.add_argument("--stage", choices=("pretrain", "finetune"), required=True)
    parser.add_argument("--index", type=int, default=0, metavar="N", help="record N of the corpus (from 0)")
    parser.add_argument("--tokens", action="store_true", help="also list every text token: id, label, piece")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from mgllava.cli import UsageError, config_from_args
    from mgllava.model import IGNORE_INDEX, MGLLaVAProcessor
    from mgllava.train.data import ConversationDataset, Skipped, prepare_record, read_corpus
    from mgllava.train.job import load_boxes

    config = config_from_args(args)
    config.check_paths("model.llm.path", "model.vision.clip_path", f"data.{args.stage}_json")
    corpus = getattr(config.data, f"{args.stage}_json")
    records = read_corpus(corpus)
    if not 0 <= args.index < len(records):
        raise UsageError("--index", f"{args.index} is outside {corpus} ({len(records)} records)")
    record, reason, detail = prepare_record(records[args.index], config.data.allow_absolute_image_paths)
    name = f"{args.stage} record {args.index} of {corpus}"
    if reason:
        print(f"{name} is rejected by training: {reason}" + (f" ({detail})" if detail else ""))
        return 1
    print(f"{name} (id {record.get('id')!r}), chat template {config.model.llm.template}")

    processor = MGLLaVAProcessor.from_config(config.model, AutoTokenizer.from_pretrained(config.model.llm.path))
    boxes = load_boxes(config.data.boxes_dir) if record.get("image") else {}
    dataset = ConversationDataset([record], config.data.image_root, boxes, processor,
                                  config.data.allow_absolute_image_paths, config.detector.max_image_pixels)
    sample = dataset[0]
    if isinstance(sample, Skipped):
        print(f"image {sample.key} is skipped by training: {sample.reason}")
        return 1
    n_image_tokens = config.model.max_length - processor.max_text_length
    n_objects = [len(b) for b in sample["boxes"]]
    if record.get("image"):
        key = record["image"]
        width, height = dataset.load_image(key).size
        detections = len(boxes[key]) if key in boxes else "no row"
        print(f"image: {key} ({width} x {height}), detections in the box table ({config.data.boxes_dir}): "
              f"{detections}")
        print(f"boxes: {n_objects[0]} after filtering and mapping, [x1, y1, x2, y2] in the "
              f"{processor.high_res} x {processor.high_res} frame:")
        for x1, y1, x2, y2 in sample["boxes"][0].tolist():
            print(f"  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
    else:
        print("image: none (a text-only record)")
    input_ids, labels = collapse_placeholders(sample["input_ids"].tolist(), sample["labels"].tolist())
    n_loss = sum(label != IGNORE_INDEX for label in labels)
    total = len(input_ids) - len(n_objects) + len(n_objects) * n_image_tokens + sum(n_objects)
    print(f"tokens: {len(input_ids)} text (budget {processor.max_text_length})"
          f" + {len(n_objects)} x {n_image_tokens} image + {sum(n_objects)} object = {total} positions"
          f" (max_length {config.model.max_length}); loss on {n_loss} text tokens")
    print(f"text, loss-bearing tokens between {LOSS_OPEN} {LOSS_CLOSE}:")
    print(render(processor.tokenizer, input_ids, labels, n_image_tokens, n_objects))
    if args.tokens:
        print("position  id  label  piece")
        for position, (token, label) in enumerate(zip(input_ids, labels)):
            piece = "<image>" if token < 0 else processor.tokenizer.convert_ids_to_tokens(token)
            print(f"{position:>8}  {token}  {label}  {piece!r}")
    return 0


def collapse_placeholders(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """The processor's expanded text (per image: N image and K object placeholders) back to the text it
    tokenised: one ``IMAGE_TOKEN_INDEX`` per image."""
    from mgllava.model import IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX

    kept = [(token, label) for position, (token, label) in enumerate(zip(input_ids, labels))
            if token != OBJECT_TOKEN_INDEX
            and not (token == IMAGE_TOKEN_INDEX and position and input_ids[position - 1] == IMAGE_TOKEN_INDEX)]
    return [token for token, _ in kept], [label for _, label in kept]


def render(tokenizer, input_ids: list[int], labels: list[int], n_image_tokens: int, n_objects: list[int]) -> str:
    """The text of ``input_ids`` with each image placeholder shown as its spliced tokens and the
    runs of loss-bearing tokens (``labels`` not ``IGNORE_INDEX``) between the loss markers."""
    from mgllava.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    parts, run, run_trained, images = [], [], False, iter(n_objects)

    def flush() -> None:
        if run:
            text = tokenizer.decode(run)
            parts.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if run_trained else text)
            run.clear()

    for token, label in zip(input_ids, labels):
        if token == IMAGE_TOKEN_INDEX:
            flush()
            parts.append(f"<image: {n_image_tokens} image + {next(images)} object tokens>")
            continue
        if (label != IGNORE_INDEX) != run_trained:
            flush()
            run_trained = label != IGNORE_INDEX
        run.append(token)
    flush()
    return "".join(parts)
