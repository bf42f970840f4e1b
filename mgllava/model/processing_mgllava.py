"""Turning (image, boxes, conversation) records into model inputs: a transformers ``ProcessorMixin``.

Picklable and free of model weights, so a training DataLoader can run it in its
worker processes. ``save_pretrained`` writes the tokenizer and ``processor_config.json``;
``from_pretrained`` (and ``AutoProcessor`` after ``import mgllava``) reads them back.

- :meth:`MGLLaVAProcessor.process_image`: PIL image + raw detections ->
  ``pixel_values`` (3, high_res, high_res) and boxes (K >= 1, 4) in the high-res frame
  (filtering and mapping in :mod:`mgllava.model.boxes`; one box per category when the
  record's text is near its budget, as the reference);
- :meth:`MGLLaVAProcessor.tokenize_conversation`: LLaVA turns + chat template ->
  ``input_ids`` and ``labels`` (T,), tokenised segment by segment with the loss
  only on trainable (assistant) segments, BOS and EOS where the template puts them,
  ``<image>`` -> ``IMAGE_TOKEN_INDEX``, truncated to ``max_text_length`` (the
  reference's token sequence for the same record and tokenizer, see :mod:`mgllava.templates`);
- :meth:`MGLLaVAProcessor.__call__`: both, for one record (:meth:`with_image_features`: the text,
  with the image's precomputed frozen features), then each ``IMAGE_TOKEN_INDEX`` expanded into the
  image's N image placeholders and K object placeholders (``OBJECT_TOKEN_INDEX``), labels -100 there
  (:meth:`expand_placeholders`): the sequence the LLM reads, token for token;
- :meth:`MGLLaVAProcessor.collate`: a batch, padded with the pad id (labels -100);
- :meth:`MGLLaVAProcessor.chat_inputs` / :meth:`decode_answers`: a left-padded batch of questions for
  ``generate``, and the answers cut at the template's stop words.
"""

from __future__ import annotations

from typing import Literal

import torch
from PIL import Image
from transformers import ProcessorMixin

from mgllava.config import ModelConfig
from mgllava.model.boxes import NEAR_MAX_LENGTH_MARGIN, Boxes, prepare_boxes
from mgllava.model.configuration_mgllava import IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX, legacy_model_config
from mgllava.model.vision import FrozenImageFeatures, image_to_pixel_values, load_image_normalisation
from mgllava.templates import IMAGE_PLACEHOLDER, ChatTemplate, get_template, llava_turns

IGNORE_INDEX = -100


class MGLLaVAProcessor(ProcessorMixin):
    def __init__(
        self,
        tokenizer,
        template: ChatTemplate | str,
        high_res: int,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        max_text_length: int,
        nms_iou: float = 0.2,
        box_cap_threshold: int = 100,
        boxes_per_category: int = 20,
        object_tokens_in_max_length: bool = False,
        image_seq_length: int = 576,
        object_tokens: bool = True,
    ):
        super().__init__(tokenizer)
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_seq_length = image_seq_length  # N: image tokens per image
        self.high_res = high_res
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.max_text_length = max_text_length
        self.nms_iou = nms_iou
        self.box_cap_threshold = box_cap_threshold
        self.boxes_per_category = boxes_per_category
        self.object_tokens_in_max_length = object_tokens_in_max_length
        self.object_tokens = object_tokens  # False: a variant without object tokens expands none (K_i = 0)
        self.pad_token_id: int = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer=None) -> MGLLaVAProcessor:
        """Tokenizer from ``llm.path``, normalisation from the CLIP directory; text budget =
        ``max_length`` minus the image tokens (e.g. 2048 - 576 = 1472)."""
        from transformers import AutoTokenizer, CLIPVisionConfig

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(config.llm.path)
        clip = CLIPVisionConfig.from_pretrained(config.vision.clip_path)
        n_image_tokens = (clip.image_size // clip.patch_size) ** 2  # N
        mean, std = load_image_normalisation(config.vision.clip_path)
        return cls(
            tokenizer,
            config.llm.template,
            high_res=config.vision.high_res,
            image_mean=mean,
            image_std=std,
            max_text_length=config.max_length - n_image_tokens,
            nms_iou=config.nms_iou,
            box_cap_threshold=config.box_cap_threshold,
            boxes_per_category=config.boxes_per_category,
            object_tokens_in_max_length=config.object_tokens_in_max_length,
            image_seq_length=n_image_tokens,
            object_tokens="objects" in config.granularities,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> MGLLaVAProcessor:
        """transformers' ``from_pretrained``; a legacy export directory (``mgllava_config.json``) is read
        through its :class:`~mgllava.config.ModelConfig`."""
        legacy = legacy_model_config(pretrained_model_name_or_path)
        if legacy is not None:
            return cls.from_config(legacy)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def to_dict(self) -> dict:
        """``processor_config.json``: the init arguments, the template by name."""
        return {**super().to_dict(), "template": self.template.name}

    # ------------------------------------------------------------------ images

    def process_image(
        self, image: Image.Image, boxes: Boxes | None = None, one_per_category: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ``pixel_values`` (3, high_res, high_res), boxes (K >= 1, 4) float in the high-res frame;
        ``one_per_category``: keep only each category's best box (a text near its budget)."""
        pixel_values = image_to_pixel_values(image, self.high_res, self.image_mean, self.image_std)
        mapped = prepare_boxes(
            boxes,
            image.width,
            image.height,
            self.high_res,
            self.nms_iou,
            self.box_cap_threshold,
            self.boxes_per_category,
            one_per_category,
        )
        return pixel_values, mapped

    # ------------------------------------------------------------------ text

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each of ``texts`` with ``<image>`` -> ``IMAGE_TOKEN_INDEX``, no special tokens added;
        the pieces between placeholders are each tokenised on their own, all in one tokenizer call."""
        split = [text.split(IMAGE_PLACEHOLDER) for text in texts]
        pieces = [piece for text_pieces in split for piece in text_pieces if piece]
        encoded = iter(self.tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else [])
        result = []
        for text_pieces in split:
            ids: list[int] = []
            for index, piece in enumerate(text_pieces):
                if index:
                    ids.append(IMAGE_TOKEN_INDEX)
                if piece:
                    ids += next(encoded)
            result.append(ids)
        return result

    def tokenize_conversation(
        self, turns: list[tuple[str, str]], add_generation_prompt: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[(role, text), ...]`` -> ``input_ids``, ``labels`` (T,) long, in the chat template (BOS and
        EOS from the tokenizer where the template places them); labels -100 off the trainable segments;
        cut to ``max_text_length`` tokens as the reference's ``encode_fn`` cuts (the image and object
        tokens are spliced in later). With ``add_generation_prompt`` the text ends with the last
        instruction, ready for ``generate``."""
        input_ids, labels = self.template.tokenize(
            self._encode,
            turns,
            self.tokenizer.bos_token_id,
            add_generation_prompt,
            IGNORE_INDEX,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        input_ids, labels = input_ids[: self.max_text_length], labels[: self.max_text_length]
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def generation_prompt(
        self, question: str, with_image: bool, history: list[tuple[str, str]] = ()
    ) -> torch.Tensor:
        """``input_ids`` (T,) of a chat ending in ``question``, after the earlier ``(question, answer)``
        pairs of ``history``; ``<image>\\n`` opens the first question when there is an image."""
        questions = [q for q, _ in history] + [question]
        if with_image:
            questions[0] = f"{IMAGE_PLACEHOLDER}\n{questions[0]}"
        turns = [turn for q, (_, a) in zip(questions, history) for turn in (("human", q), ("gpt", a))]
        input_ids, _ = self.tokenize_conversation(turns + [("human", questions[-1])], add_generation_prompt=True)
        return input_ids

    # ------------------------------------------------------------------ records and batches

    def __call__(
        self,
        turns: list[tuple[str, str]],
        images: list[Image.Image] | None = None,
        boxes: list[Boxes | None] | None = None,
    ) -> dict:
        """One training record -> ``input_ids``, ``labels`` (T,), ``pixel_values`` (n_images, 3, H, H),
        ``boxes`` (n_images tensors (K_i, 4)). ``turns`` must hold one ``<image>`` per image.

        A text within ``NEAR_MAX_LENGTH_MARGIN`` tokens of ``max_text_length`` keeps one box per
        category; with ``object_tokens_in_max_length`` the text is then cut by the object tokens'
        count, so the spliced sequence fits ``max_text_length`` + the image tokens."""
        images = images or []
        boxes = boxes if boxes is not None else [None] * len(images)
        if len(boxes) != len(images):
            raise ValueError(f"{len(images)} images, {len(boxes)} box sets")
        input_ids, labels = self._tokenize_record(turns, len(images))
        near_max_length = len(input_ids) >= self.max_text_length - NEAR_MAX_LENGTH_MARGIN
        processed = [self.process_image(image, b, near_max_length) for image, b in zip(images, boxes)]
        n_objects = [len(b) for _, b in processed]
        input_ids, labels = self.expand_placeholders(*self._fit_object_tokens(input_ids, labels, n_objects), n_objects)
        pixel_values = (
            torch.stack([p for p, _ in processed])
            if processed
            else torch.zeros(0, 3, self.high_res, self.high_res)
        )
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "boxes": [b for _, b in processed],
        }

    def with_image_features(self, turns: list[tuple[str, str]], features: list[FrozenImageFeatures]) -> dict:
        """As :meth:`__call__`, with each image's precomputed frozen features (B = 1 each) in place of the
        image and its boxes: ``input_ids``, ``labels`` (T,), ``image_features``. The features hold each
        image's boxes as cached, so the one-box-per-category rule near the budget does not apply here."""
        input_ids, labels = self._tokenize_record(turns, len(features))
        n_objects = [len(f.box_features[0]) for f in features]
        input_ids, labels = self.expand_placeholders(*self._fit_object_tokens(input_ids, labels, n_objects), n_objects)
        return {"input_ids": input_ids, "labels": labels, "image_features": features}

    def expand_placeholders(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None, n_objects: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) ids with one ``IMAGE_TOKEN_INDEX`` per image -> ids and labels (T + Σ(N + K_i - 1),): image i's
        placeholder becomes N ``IMAGE_TOKEN_INDEX`` then ``n_objects[i]`` ``OBJECT_TOKEN_INDEX``, labels -100
        there (``labels`` None: -100 everywhere)."""
        labels = labels if labels is not None else torch.full_like(input_ids, IGNORE_INDEX)
        positions = (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(positions) != len(n_objects):
            raise ValueError(f"{len(positions)} image placeholders, {len(n_objects)} images")
        id_pieces, label_pieces, start = [], [], 0
        for position, k in zip(positions, n_objects if self.object_tokens else [0] * len(n_objects)):
            visual = torch.tensor([IMAGE_TOKEN_INDEX] * self.image_seq_length + [OBJECT_TOKEN_INDEX] * k)
            id_pieces += [input_ids[start:position], visual]
            label_pieces += [labels[start:position], torch.full_like(visual, IGNORE_INDEX)]
            start = position + 1
        return torch.cat([*id_pieces, input_ids[start:]]), torch.cat([*label_pieces, labels[start:]])

    def _fit_object_tokens(
        self, input_ids: torch.Tensor, labels: torch.Tensor, n_objects: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``object_tokens_in_max_length``, the text cut by the images' object-token counts."""
        if not (self.object_tokens and self.object_tokens_in_max_length) or not n_objects:
            return input_ids, labels
        budget = self.max_text_length - sum(n_objects)
        input_ids, labels = input_ids[:budget], labels[:budget]
        if (input_ids == IMAGE_TOKEN_INDEX).sum() != len(n_objects):
            raise ValueError(f"text cut to {budget} tokens to fit the object tokens cut off an image placeholder")
        return input_ids, labels

    def _tokenize_record(self, turns: list[tuple[str, str]], n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A training record's text, prepared as the reference's ``llava_map_fn`` does
        (:func:`~mgllava.templates.llava_turns`: ``<image>`` first in its turn, leading assistant
        turns dropped). The placeholder sits within the first few tokens, so only a
        ``max_text_length`` shorter than that can cut it off: ``ValueError`` then."""
        turns = llava_turns(turns)
        n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if n_placeholders != n_images:
            raise ValueError(f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders, {n_images} images")
        input_ids, labels = self.tokenize_conversation(turns)
        if (input_ids == IMAGE_TOKEN_INDEX).sum() != n_images:
            raise ValueError(f"text truncated to {self.max_text_length} tokens cut off an image placeholder")
        return input_ids, labels

    def chat_inputs(
        self,
        images: list[Image.Image | FrozenImageFeatures | None],
        boxes: list[Boxes | None],
        questions: list[str],
        histories: list[list[tuple[str, str]]] | None = None,
    ) -> dict:
        """A left-padded batch for ``generate``, one row per (image or None, detections or None,
        question): the chat template with ``<image>\\n`` + the first question, after the row's earlier
        ``(question, answer)`` turns of ``histories`` if given, ending with the assistant's prompt.
        An image may come as its precomputed :class:`FrozenImageFeatures` (B = 1, encoded from
        :meth:`process_image`'s outputs; its boxes are the ones encoded, the row's ``boxes`` entry is
        unused); a batch holds images or features, not both.
        -> ``input_ids``, ``attention_mask`` (B, T), ``pixel_values`` (n_images, 3, H, H) or None,
        ``boxes`` (n_images tensors (K_i, 4)), ``image_features`` (n_images) or None."""
        histories = histories or [[] for _ in questions]
        samples = []
        for image, image_boxes, question, history in zip(images, boxes, questions, histories, strict=True):
            input_ids = self.generation_prompt(question, with_image=image is not None, history=history)
            sample = {"input_ids": input_ids}
            if isinstance(image, FrozenImageFeatures):
                sample.update(image_features=[image])
                n_objects = len(image.box_features[0])
            elif image is not None:
                pixel_values, mapped = self.process_image(image, image_boxes)
                sample.update(pixel_values=pixel_values[None], boxes=[mapped])
                n_objects = len(mapped)
            if image is not None:
                sample["input_ids"], _ = self.expand_placeholders(input_ids, None, [n_objects])
            samples.append(sample)
        batch = self.collate(samples, padding_side="left")
        if batch["pixel_values"] is not None and batch["image_features"] is not None:
            raise ValueError("chat_inputs: a batch mixes images and precomputed image features")
        return {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "boxes", "image_features")}

    def decode_answers(self, generated: torch.Tensor) -> list[str]:
        """(B, new tokens) from ``generate`` (the prompt cut off) -> the answers: the text before the first
        stop word or EOS token, stripped."""
        stops = (*self.template.stop_words, *([self.tokenizer.eos_token] if self.tokenizer.eos_token else []))
        answers = []
        for text in self.tokenizer.batch_decode(generated):
            for marker in stops:
                text = text.split(marker, 1)[0]
            answers.append(text.strip())
        return answers

    def generate_kwargs(self) -> dict:
        """What ``generate`` needs to stop at the chat template's stop words."""
        if not self.template.stop_words:
            return {}
        return {"stop_strings": list(self.template.stop_words), "tokenizer": self.tokenizer}

    def collate(self, samples: list[dict], padding_side: Literal["right", "left"] = "right",
                pad_to_multiple_of: int = 1) -> dict:
        """Pad a list of records: ``input_ids``, ``attention_mask``, ``labels`` (B, T), T rounded up to
        ``pad_to_multiple_of``;
        ``pixel_values`` (sum n_images, 3, H, H) or None; ``boxes``: one (K_i, 4) tensor per image;
        ``image_features``: the records' precomputed :class:`FrozenImageFeatures`, or None."""
        pixel_values = [s["pixel_values"] for s in samples if len(s.get("pixel_values", ()))]
        features = [f for s in samples for f in s.get("image_features", ())]
        return {
            **pad_text(samples, self.pad_token_id, padding_side, pad_to_multiple_of),
            "pixel_values": torch.cat(pixel_values) if pixel_values else None,
            "boxes": [b for s in samples for b in s.get("boxes", ())],
            "image_features": FrozenImageFeatures.cat(features) if features else None,
        }


def pad_text(samples: list[dict], pad_token_id: int, padding_side: Literal["right", "left"] = "right",
             pad_to_multiple_of: int = 1) -> dict:
    """Pad the samples' ``input_ids`` (and ``labels``, where given) into ``input_ids``,
    ``attention_mask``, ``labels`` (B, T), T the longest sample rounded up to ``pad_to_multiple_of``;
    labels are ``IGNORE_INDEX`` on padding."""
    length = -(-max(len(s["input_ids"]) for s in samples) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        input_ids[row, span] = torch.as_tensor(sample["input_ids"])
        attention_mask[row, span] = 1
        if "labels" in sample:
            labels[row, span] = torch.as_tensor(sample["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
