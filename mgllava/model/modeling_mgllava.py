"""MG-LLaVA: a causal LLM that reads low-res, high-res and object-level image features.

Per image (SPEC sections 2-4, shapes at full size):

- ``pixel_values`` (3, 768, 768) -> ConvNeXt stage maps (192@192², 384@96², 768@48², 1536@24²);
- its 336 downsample -> CLIP tokens (576, 1024);
- :class:`ConvGateFusion` (CLIP tokens, stage-4 map) -> (576, 1024) -> projector -> (576, D);
- boxes (K, 4) in the 768 frame -> RoIAlign over the stage maps -> (K, 2880) -> box projector -> (K, D).

A variant of the paper's ablation (``config.granularities``, :mod:`mgllava.ablation`) is built without the
fusion (no ``"high"``: the projector reads the CLIP tokens as they are) or without the box projector (no
``"objects"``: no object tokens, and the processor expands none).

The text arrives expanded by :class:`~mgllava.model.processing_mgllava.MGLLaVAProcessor`: per image, N
``image_token_id`` placeholders then K ``object_token_id`` placeholders. :meth:`embed_multimodal`
scatters the image and object tokens into those positions (as transformers' LLaVA does with
``masked_scatter``); placeholder ids are mapped to id 0 before the embedding lookup.

:meth:`MGLLaVAForConditionalGeneration.encode_frozen` runs the frozen part (encoders, RoIAlign) and
:meth:`encode_images` the trainable part over its output, which training may cache.

Both encoders are frozen in every stage and run without autograd; the trainable parts are the fusion,
the projector and the box projector (stage ``pretrain``), plus the LLM (stage ``finetune``).
Construction: :meth:`from_config` (a :class:`~mgllava.config.ModelConfig`: the LLM, CLIP and ConvNeXt
checkpoints loaded, the rest freshly initialised) or ``from_pretrained`` (an export). Checkpoints:
:meth:`save_trainable` / :meth:`load_trainable` (safetensors of the trainable weights) and
:meth:`export` (one ``save_pretrained`` directory with the processor). Decoding is transformers'
``generate`` (greedy, sampling, beam search, stop strings, streamers) with the LLM's KV cache.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mgllava.config import ModelConfig
from mgllava.model.configuration_mgllava import MGLLaVAConfig, legacy_model_config
from mgllava.model.fusion import ConvGateFusion
from mgllava.model.object_features import pool_object_features
from mgllava.model.processing_mgllava import IGNORE_INDEX
from mgllava.model.projector import MLPProjector
from mgllava.model.vision import (
    FrozenImageFeatures,
    HighResEncoder,
    LowResEncoder,
    build_high_res_encoder,
    downsample,
    load_high_res_encoder,
    load_low_res_encoder,
)

Stage = Literal["pretrain", "finetune"]
LEGACY_PROJECTORS = "mgllava_projectors.safetensors"  # fusion, projector, box projector of a legacy export
PROJECTOR_MODULES = ("fusion", "projector", "box_projector")
EXPORT_SHARD_SIZE = "5GB"


LABELLED_ROWS_MULTIPLE = 64
""":func:`next_token_loss` projects a multiple of this many rows: on a CPU under bf16 autocast every new
matrix shape costs new kernels and memory, and the count of labelled tokens changes with every batch."""


PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
"""LLM architectures whose logits are their output projection of the decoder's last hidden state and nothing
more (no final soft-capping as Gemma-2's, no logit scale as Cohere's or Granite's): :func:`next_token_loss`
computes their training loss. Any other LLM's loss comes from its own forward over the full logits."""


def next_token_loss(llm: PreTrainedModel, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """A causal LM's mean next-token loss over the positions of ``labels`` (B, T) that are not
    ``IGNORE_INDEX``: transformers' loss, with the vocabulary projection run only on the hidden states
    that predict a label (their count rounded up to a multiple of ``LABELLED_ROWS_MULTIPLE`` with
    unlabelled rows), so the (B, T, vocab) logits of the batch are never built. ``inputs`` go to the
    LLM's decoder (``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``position_ids``). For an
    architecture outside :data:`PLAIN_HEAD_MODEL_TYPES`, the LLM's own loss (its full logits)."""
    if llm.config.model_type not in PLAIN_HEAD_MODEL_TYPES:
        return llm(**inputs, labels=labels, use_cache=False).loss
    hidden = llm.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, D)
    batch_index, position = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,) each: t predicts t + 1
    targets = labels[batch_index, position + 1]  # (N,)
    padding = -len(targets) % LABELLED_ROWS_MULTIPLE
    rows = torch.cat([batch_index * labels.shape[1] + position, position.new_zeros(padding)])  # into (B * T)
    targets = torch.cat([targets, targets.new_full((padding,), IGNORE_INDEX)])  # the padding rows: no loss
    logits = llm.get_output_embeddings()(hidden.flatten(0, 1)[rows])  # (N + padding, vocab)
    return F.cross_entropy(logits.float(), targets)


class MGLLaVAForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = MGLLaVAConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(
        self,
        config: MGLLaVAConfig,
        llm: PreTrainedModel | None = None,
        low_res_encoder: LowResEncoder | None = None,
        high_res_encoder: HighResEncoder | None = None,
    ):
        """Built from ``config`` alone (random weights, as ``from_pretrained`` does before loading), or
        around already loaded towers (:meth:`from_config`)."""
        super().__init__(config)
        self.llm = llm or AutoModelForCausalLM.from_config(config.text_config)  # a transformers causal LM
        self.low_res_encoder = low_res_encoder or LowResEncoder(
            CLIPVisionModel(config.vision_config), config.select_layer
        )
        self.high_res_encoder = high_res_encoder or build_high_res_encoder(config.convnext_config)
        low_width, llm_width = self.low_res_encoder.hidden_size, config.text_config.hidden_size  # d, D
        # the variant (config.granularities): the Conv-Gate only with "high", object tokens only with "objects"
        self.fusion = (ConvGateFusion(low_width, self.high_res_encoder.stage_channels[-1])
                       if "high" in config.granularities else None)
        self.projector = MLPProjector(low_width, llm_width)
        self.box_projector = (MLPProjector(sum(self.high_res_encoder.stage_channels), llm_width)
                              if "objects" in config.granularities else None)
        self.post_init()
        self.set_stage("pretrain")

    def _init_weights(self, module) -> None:
        """The fusion, projectors and ConvNeXt keep the initialisation of their constructors (the LLM and
        CLIP, transformers models, initialise themselves)."""

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> MGLLaVAForConditionalGeneration:
        """Build from local checkpoints (LLM, CLIP, ConvNeXt); fusion and projectors freshly initialised."""
        llm = AutoModelForCausalLM.from_pretrained(config.llm.path, dtype=dtype,
                                                   attn_implementation=config.llm.attention)
        low_res = load_low_res_encoder(config.vision.clip_path, config.vision.select_layer)
        high_res = load_high_res_encoder(config.vision.convnext_path)
        for tower in (llm, low_res, high_res):  # loaded: post_init must not initialise them again
            for module in tower.modules():
                module._is_hf_initialized = True
        model = cls(MGLLaVAConfig.from_model_config(config), llm, low_res, high_res)
        model.generation_config = llm.generation_config
        return model.to(dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> MGLLaVAForConditionalGeneration:
        """transformers' ``from_pretrained``; a legacy export (``mgllava_config.json``, ``llm/``, ``clip/``,
        ``convnext/``, projector file) is converted while loading (:func:`upgrade_export` rewrites one)."""
        legacy = legacy_model_config(pretrained_model_name_or_path)
        if legacy is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = cls.from_config(legacy, dtype=kwargs.get("dtype") or torch.float32)
        model.load_weights(Path(pretrained_model_name_or_path) / LEGACY_PROJECTORS,
                           expected=set(model.projector_state_dict()))
        return model

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    # ------------------------------------------------------------------ stages

    def set_stage(self, stage: Stage) -> None:
        """``pretrain``: train fusion + projectors; ``finetune``: those and the LLM. Encoders stay frozen."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"unknown stage {stage!r}; expected 'pretrain' or 'finetune'")
        self.requires_grad_(False)
        for name in PROJECTOR_MODULES:
            if getattr(self, name) is not None:  # a variant may lack the fusion or the box projector
                getattr(self, name).requires_grad_(True)
        self.llm.requires_grad_(stage == "finetune")
        self.stage = stage

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each LLM layer's activations in the backward pass instead of keeping them (in
        training mode). Non-reentrant checkpointing: gradients also flow through a frozen LLM (stage
        ``pretrain``) to the projectors, and the loss and gradients are those without it."""
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def train(self, mode: bool = True) -> MGLLaVAForConditionalGeneration:
        """As ``nn.Module.train``, but the frozen encoders always stay in eval mode (no drop path)."""
        super().train(mode)
        self.low_res_encoder.eval()
        self.high_res_encoder.eval()
        return self

    def trainable_summary(self) -> str:
        """A table of trainable / total parameter counts per top-level module."""
        rows = [("module", "trainable", "total")]
        totals = [0, 0]
        for name, module in self.named_children():
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            total = sum(p.numel() for p in module.parameters())
            rows.append((name, f"{trainable:,}", f"{total:,}"))
            totals = [totals[0] + trainable, totals[1] + total]
        rows.append((f"all (stage {self.stage})", f"{totals[0]:,}", f"{totals[1]:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)

    # ------------------------------------------------------------------ vision

    @torch.no_grad()
    def encode_frozen(self, pixel_values: torch.Tensor, boxes: list[torch.Tensor]) -> FrozenImageFeatures:
        """What the frozen encoders make of ``pixel_values`` (B, 3, H, H) and B box tensors (K_i, 4) in
        the H frame. No autograd: nothing here trains, so training may compute it once per image. A variant
        computes only what it reads: without ``"high"`` no ``high_map``, without ``"objects"`` no RoIAlign
        (K_i = 0), and ``low`` alone runs no ConvNeXt."""
        dtype = self.projector[0].weight.dtype
        pixel_values = pixel_values.to(self.device, dtype)
        low_tokens = self.low_res_encoder(downsample(pixel_values, self.config.low_res))  # (B, N, d)
        if self.fusion is None and self.box_projector is None:  # the variant "low" reads no ConvNeXt
            return FrozenImageFeatures(low_tokens, None, [low_tokens.new_zeros(0, 0)] * len(low_tokens))
        stage_maps = self.high_res_encoder(pixel_values)  # 4 x (B, C_s, H/stride_s, H/stride_s)
        high_map = stage_maps[-1] if self.fusion is not None else None
        if self.box_projector is None:  # no object tokens: K_i = 0, no RoIAlign
            return FrozenImageFeatures(low_tokens, high_map, [low_tokens.new_zeros(0, 0)] * len(low_tokens))
        box_features = pool_object_features(
            stage_maps,
            boxes,
            high_res=pixel_values.shape[-1],
            output_size=self.config.roi_output,
            method=self.config.object_features,
            aligned=self.config.roi_aligned,
        )  # B x (K_i, C_total)
        return FrozenImageFeatures(low_tokens, high_map, list(box_features))

    def encode_images(
        self,
        pixel_values: torch.Tensor | None = None,
        boxes: list[torch.Tensor] | None = None,
        frozen: FrozenImageFeatures | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images (``pixel_values`` and ``boxes``, or their ``frozen`` features) -> image tokens
        (B, N, D) and B object-token tensors (K_i, D)."""
        if frozen is None:
            frozen = self.encode_frozen(pixel_values, boxes)
        frozen = frozen.to(self.device, self.projector[0].weight.dtype)
        low_tokens = frozen.low_tokens  # (B, N, d)
        fused = low_tokens if self.fusion is None else self.fusion(low_tokens, frozen.high_map)  # (B, N, d)
        image_tokens = self.projector(fused)  # (B, N, D)
        if self.box_projector is None:  # a variant without object tokens: K_i = 0
            return image_tokens, [image_tokens.new_zeros(0, image_tokens.shape[-1])] * len(image_tokens)
        counts = [len(f) for f in frozen.box_features]
        object_tokens = self.box_projector(torch.cat(frozen.box_features)).split(counts)  # B x (K_i, D)
        return image_tokens, list(object_tokens)

    # ------------------------------------------------------------------ LLM

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        boxes: list[torch.Tensor] | None = None,
        image_features: FrozenImageFeatures | None = None,
    ) -> torch.Tensor:
        """``input_ids`` (B, T) with expanded placeholders -> ``inputs_embeds`` (B, T, D): text embeddings,
        with the images' N image tokens and K_i object tokens scattered into their placeholders in
        reading order (row 0 first). Images come as ``pixel_values`` (n, 3, H, H) and ``boxes`` (n tensors
        (K_i, 4); None: one all-zero box each), or as their precomputed frozen ``image_features``."""
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        object_mask = input_ids == self.config.object_token_id  # (B, T)
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image_mask | object_mask, 0))  # (B, T, D)
        has_images = image_features is not None or (pixel_values is not None and len(pixel_values))
        if not has_images:
            if (image_mask | object_mask).any():
                raise ValueError(f"{int(image_mask.sum())} image placeholders in input_ids but no images")
            return embeds
        if image_features is None:
            boxes = boxes if boxes is not None else [torch.zeros(1, 4)] * len(pixel_values)
        image_tokens, object_tokens = self.encode_images(pixel_values, boxes, image_features)
        object_tokens = torch.cat(object_tokens)  # (ΣK, D)
        if int(image_mask.sum()) != image_tokens.shape[0] * image_tokens.shape[1] or int(
            object_mask.sum()
        ) != len(object_tokens):
            raise ValueError(
                f"{int(image_mask.sum())} image and {int(object_mask.sum())} object placeholders in input_ids, "
                f"but {image_tokens.shape[0]} images of {image_tokens.shape[1]} tokens and {len(object_tokens)} "
                "object tokens"
            )
        embeds = embeds.masked_scatter(image_mask[..., None], image_tokens.to(embeds.dtype))
        return embeds.masked_scatter(object_mask[..., None], object_tokens.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        boxes: list[torch.Tensor] | None = None,
        image_features: FrozenImageFeatures | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_only: bool = False,
        **kwargs,
    ):
        """A batch as :meth:`MGLLaVAProcessor.collate` builds it -> the LLM's output (``loss`` with labels,
        ``logits`` (B, T, vocab), ``cache``). Position ids count real tokens (``attention_mask``), so a
        left-padded row sees the positions it would see alone. ``loss_only`` (with ``labels``; what
        training uses): the output holds the loss alone, computed by :func:`next_token_loss` without the
        batch's logits."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_multimodal(input_ids, pixel_values, boxes, image_features)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1]:]
        if loss_only:
            if labels is None:
                raise ValueError("loss_only needs labels")
            loss = next_token_loss(self.llm, labels, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)
            return CausalLMOutputWithPast(loss=loss)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        boxes: list[torch.Tensor] | None = None,
        image_features: FrozenImageFeatures | None = None,
        **kwargs,
    ):
        """GenerationMixin's ``generate`` (every decoding option, the KV cache) on a prompt whose images are
        spliced in first: the prompt goes in as ``inputs_embeds`` (B, T, D), and decoding sees its token
        ids with each placeholder as the pad token, so that logits processors which index the vocabulary
        by the sequence's ids (``repetition_penalty``, ...) work. Beam search repeats the embedded rows."""
        if input_ids is not None and kwargs.get("inputs_embeds") is None:
            kwargs["inputs_embeds"] = self.embed_multimodal(input_ids, pixel_values, boxes, image_features)
            pad = self.generation_config.pad_token_id
            placeholders = (input_ids == self.config.image_token_id) | (input_ids == self.config.object_token_id)
            input_ids = input_ids.masked_fill(placeholders, 0 if pad is None else pad)
        return super().generate(input_ids=input_ids, **kwargs)

    # ------------------------------------------------------------------ checkpoints

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().contiguous() for name, p in self.named_parameters() if p.requires_grad}

    def projector_state_dict(self) -> dict[str, torch.Tensor]:
        """Fusion, projector and box projector weights (what the LLM and encoders do not hold)."""
        return {
            name: tensor.contiguous()
            for name, tensor in self.state_dict().items()
            if name.split(".", 1)[0] in PROJECTOR_MODULES
        }

    def save_trainable(self, path: str | Path) -> Path:
        """Write the trainable parameters (this stage's) as one safetensors file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), path, metadata={"stage": self.stage})
        return path

    def load_trainable(self, path: str | Path) -> None:
        """Load a :meth:`save_trainable` file: a pretrain one (to start finetuning from it) or a
        finetune one. It must hold the fusion and projector weights, and nothing that is not a
        parameter of this model."""
        self.load_weights(path, expected=set(self.projector_state_dict()))

    def load_weights(self, path: str | Path, expected: set[str] | None = None) -> None:
        """Load a safetensors file of some of this model's weights; every tensor in it must name one
        of them, and with ``expected`` those names must all be present."""
        tensors = load_file(Path(path), device=str(self.device))
        unexpected = self.load_state_dict(tensors, strict=False).unexpected_keys
        missing = sorted((expected or set()) - set(tensors))
        if unexpected or missing:
            raise KeyError(f"{path}: unexpected tensors {unexpected[:5]}, missing tensors {missing[:5]}")

    def export(
        self,
        directory: str | Path,
        processor,
        box_table: str | Path | None = None,
        detector_dir: str | Path | None = None,
    ) -> Path:
        """Write one ``save_pretrained`` directory that ``from_pretrained`` and the Auto classes load::

        config.json, generation_config.json     MGLLaVAConfig (LLM, CLIP and ConvNeXt configs inside)
        model*.safetensors                      all weights (LLM, CLIP, ConvNeXt, fusion, projectors),
                                                sharded at 5 GB
        tokenizer files, processor_config.json  ``processor`` (MGLLaVAProcessor.save_pretrained)
        detector/                               with ``box_table`` (the training boxes): the detector that
                                                made it, weights copied, and detector.json (sha256,
                                                parameters); with ``detector_dir``: that record, copied.
                                                Evaluation detects with it (:mod:`mgllava.eval.boxes`)

        It is written to a hidden directory beside ``directory`` and renamed into place (an
        existing export is renamed aside first, then deleted), so ``directory`` is never
        half-written, even if the process is killed. Leftovers of a killed export are removed.
        """
        from mgllava.eval.boxes import EXPORT_DETECTOR_DIR, record_detector

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        for leftover in directory.parent.glob(f".{glob.escape(directory.name)}.*-*"):
            shutil.rmtree(leftover)
        staging = directory.parent / f".{directory.name}.partial-{os.getpid()}"
        try:
            self.save_pretrained(staging, max_shard_size=EXPORT_SHARD_SIZE)
            processor.save_pretrained(staging)
            if box_table is not None:
                record_detector(box_table, staging / EXPORT_DETECTOR_DIR)
            elif detector_dir is not None:
                shutil.copytree(detector_dir, staging / EXPORT_DETECTOR_DIR)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = directory.parent / f".{directory.name}.old-{os.getpid()}"
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory


@torch.no_grad()
def answer_questions(model, processor, images, boxes, questions, histories=None, **generate_kwargs) -> list[str]:
    """Answers for a batch of (image, boxes, question) as :meth:`MGLLaVAProcessor.chat_inputs` reads them:
    the image a PIL image, its precomputed :class:`FrozenImageFeatures`, or None; the boxes a
    :class:`~mgllava.model.boxes.Boxes` or None. Each answers after its earlier ``(question, answer)``
    turns of ``histories``: one left-padded ``generate`` call (``generate_kwargs``: ``max_new_tokens``,
    ``do_sample``, ``num_beams``, ``streamer``...; greedy by default), stopping at the chat template's
    stop words, which are cut from the answers."""
    inputs = processor.chat_inputs(images, boxes, questions, histories)
    inputs = {key: value.to(model.device) if isinstance(value, torch.Tensor) else value
              for key, value in inputs.items()}
    generate_kwargs = {"do_sample": False, **processor.generate_kwargs(), **generate_kwargs}
    generated = model.generate(**inputs, **generate_kwargs)  # (B, T + new)
    return processor.decode_answers(generated[:, inputs["input_ids"].shape[1]:])


def upgrade_export(directory: str | Path) -> Path:
    """Rewrite a legacy export (``mgllava_config.json`` + ``llm/``, ``clip/``, ``convnext/``, projector file,
    ``detector/``) in place as a ``save_pretrained`` export (atomically, as :meth:`export`)."""
    from mgllava.eval.boxes import EXPORT_DETECTOR_DIR
    from mgllava.model.processing_mgllava import MGLLaVAProcessor

    directory = Path(directory)
    if legacy_model_config(directory) is None:
        raise ValueError(f"{directory} is not a legacy MG-LLaVA export (no mgllava_config.json)")
    model = MGLLaVAForConditionalGeneration.from_pretrained(directory)
    processor = MGLLaVAProcessor.from_pretrained(directory)
    detector = directory / EXPORT_DETECTOR_DIR
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".upgrade-") as keep:  # beside, same disk
        kept = Path(keep) / EXPORT_DETECTOR_DIR
        if detector.is_dir():
            shutil.copytree(detector, kept)
        return model.export(directory, processor, detector_dir=kept if detector.is_dir() else None)
