"""MG-LLaVA: a causal LLM that reads low-res, high-res and object-level image features.

Per image (SPEC sections 2-4, shapes at full size):

- ``pixel_values`` (3, 768, 768) -> ConvNeXt stage maps (192@192², 384@96², 768@48², 1536@24²);
- its 336 downsample -> CLIP tokens (576, 1024);
- :class:`ConvGateFusion` (CLIP tokens, stage-4 map) -> (576, 1024) -> projector -> (576, D);
- boxes (K, 4) in the 768 frame -> RoIAlign over the stage maps -> (K, 2880) -> box projector -> (K, D).

:meth:`MGLLaVA.encode_frozen` runs the frozen part (encoders, RoIAlign) and
:meth:`MGLLaVA.encode_images` the trainable part over its output, which training may cache.

Both encoders are frozen in every stage and run without autograd; the trainable
parts are the fusion, the projector and the box projector (stage ``pretrain``), plus
the LLM (stage ``finetune``). Checkpoints: :meth:`MGLLaVA.save_trainable` /
:meth:`MGLLaVA.load_trainable` (safetensors of the trainable weights) and
:meth:`MGLLaVA.export` / :meth:`MGLLaVA.from_pretrained` (one self-contained directory).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from mgllava.config import ModelConfig
from mgllava.model.boxes import Boxes
from mgllava.model.fusion import ConvGateFusion
from mgllava.model.object_features import pool_object_features
from mgllava.model.processing_mgllava import MGLLaVAProcessor
from mgllava.model.projector import MLPProjector
from mgllava.model.splice import MultimodalInputs, prepare_inputs_labels_for_multimodal
from mgllava.model.vision import (
    FrozenImageFeatures,
    HighResEncoder,
    LowResEncoder,
    downsample,
    load_high_res_encoder,
    load_low_res_encoder,
)

Stage = Literal["pretrain", "finetune"]
EXPORT_CONFIG = "mgllava_config.json"
EXPORT_PROJECTORS = "mgllava_projectors.safetensors"  # fusion, projector, box projector
PROJECTOR_MODULES = ("fusion", "projector", "box_projector")


class MGLLaVA(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        llm: nn.Module,
        processor: MGLLaVAProcessor,
        low_res_encoder: LowResEncoder,
        high_res_encoder: HighResEncoder,
    ):
        super().__init__()
        self.config = config
        self.processor = processor
        self.llm = llm  # a transformers causal LM
        self.low_res_encoder = low_res_encoder
        self.high_res_encoder = high_res_encoder
        llm_width = llm.get_input_embeddings().embedding_dim  # D
        self.fusion = ConvGateFusion(low_res_encoder.hidden_size, high_res_encoder.stage_channels[-1])
        self.projector = MLPProjector(low_res_encoder.hidden_size, llm_width)
        self.box_projector = MLPProjector(sum(high_res_encoder.stage_channels), llm_width)
        self.set_stage("pretrain")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> MGLLaVA:
        """Build from local checkpoints (LLM, CLIP, ConvNeXt); fusion and projectors freshly initialised."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.llm.path)
        llm = AutoModelForCausalLM.from_pretrained(config.llm.path, dtype=dtype)
        processor = MGLLaVAProcessor.from_config(config, tokenizer)
        low_res = load_low_res_encoder(config.vision.clip_path, config.vision.select_layer)
        high_res = load_high_res_encoder(config.vision.convnext_path)
        return cls(config, llm, processor, low_res, high_res).to(dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> MGLLaVA:
        """Load a directory written by :meth:`export` (its config paths are relative to it)."""
        directory = Path(directory)
        tree = json.loads((directory / EXPORT_CONFIG).read_text())
        tree["llm"]["path"] = str(directory / tree["llm"]["path"])
        for key in ("clip_path", "convnext_path"):
            tree["vision"][key] = str(directory / tree["vision"][key])
        model = cls.from_config(ModelConfig.model_validate(tree), dtype)
        model.load_weights(directory / EXPORT_PROJECTORS, expected=set(model.projector_state_dict()))
        return model

    # ------------------------------------------------------------------ stages

    def set_stage(self, stage: Stage) -> None:
        """``pretrain``: train fusion + projectors; ``finetune``: those and the LLM. Encoders stay frozen."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"unknown stage {stage!r}; expected 'pretrain' or 'finetune'")
        self.requires_grad_(False)
        for name in PROJECTOR_MODULES:
            getattr(self, name).requires_grad_(True)
        self.llm.requires_grad_(stage == "finetune")
        self.stage = stage

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each LLM layer's activations in the backward pass instead of keeping them (in
        training mode). Non-reentrant checkpointing: gradients also flow through a frozen LLM (stage
        ``pretrain``) to the projectors, and the loss and gradients are those without it."""
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def train(self, mode: bool = True) -> MGLLaVA:
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

    @property
    def dtype(self) -> torch.dtype:
        return self.projector[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    @torch.no_grad()
    def encode_frozen(self, pixel_values: torch.Tensor, boxes: list[torch.Tensor]) -> FrozenImageFeatures:
        """What the frozen encoders make of ``pixel_values`` (B, 3, H, H) and B box tensors (K_i, 4) in
        the H frame. No autograd: nothing here trains, so training may compute it once per image."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        stage_maps = self.high_res_encoder(pixel_values)  # 4 x (B, C_s, H/stride_s, H/stride_s)
        low_tokens = self.low_res_encoder(downsample(pixel_values, self.config.vision.low_res))  # (B, N, d)
        box_features = pool_object_features(
            stage_maps,
            boxes,
            high_res=pixel_values.shape[-1],
            output_size=self.config.roi_output,
            method=self.config.object_features,
            aligned=self.config.roi_aligned,
        )  # B x (K_i, C_total)
        return FrozenImageFeatures(low_tokens, stage_maps[-1], list(box_features))

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
        frozen = frozen.to(self.device, self.dtype)
        fused = self.fusion(frozen.low_tokens, frozen.high_map)  # (B, N, d)
        image_tokens = self.projector(fused)  # (B, N, D)
        counts = [len(f) for f in frozen.box_features]
        object_tokens = self.box_projector(torch.cat(frozen.box_features)).split(counts)  # B x (K_i, D)
        return image_tokens, list(object_tokens)

    # ------------------------------------------------------------------ LLM

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        boxes: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        padding_side: Literal["right", "left"] = "right",
        image_features: FrozenImageFeatures | None = None,
    ) -> MultimodalInputs:
        """Encode the images (one per placeholder, reading order; from ``pixel_values`` and ``boxes``, or
        from their precomputed ``image_features``) and splice them into the text."""
        image_tokens, object_tokens = [], []
        if image_features is not None and len(image_features):
            encoded, object_tokens = self.encode_images(frozen=image_features)
            image_tokens = list(encoded)
        elif pixel_values is not None and len(pixel_values):
            boxes = boxes if boxes is not None else [torch.zeros(1, 4)] * len(pixel_values)  # one zero box each
            encoded, object_tokens = self.encode_images(pixel_values, boxes)
            image_tokens = list(encoded)
        device = self.device
        return prepare_inputs_labels_for_multimodal(
            input_ids.to(device),
            attention_mask.to(device),
            labels.to(device) if labels is not None else None,
            self.llm.get_input_embeddings(),
            image_tokens,
            object_tokens,
            padding_side=padding_side,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        boxes: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        padding_side: Literal["right", "left"] = "right",
        image_features: FrozenImageFeatures | None = None,
    ):
        """A batch as :meth:`MGLLaVAProcessor.collate` builds it -> the LLM's output (``loss`` with labels,
        ``logits`` (B, T, vocab) over the spliced sequence)."""
        inputs = self.prepare_inputs(
            input_ids, attention_mask, pixel_values, boxes, labels, padding_side, image_features
        )
        return self.llm(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            labels=inputs.labels,
        )

    @torch.no_grad()
    def generate(
        self,
        images: list[Image.Image | None],
        boxes: list[Boxes | None],
        questions: list[str],
        max_new_tokens: int = 32,
        histories: list[list[tuple[str, str]]] | None = None,
    ) -> list[str]:
        """Greedy answers for a batch of (image or None, detections or None, question).

        Prompts are the chat template with ``<image>\\n`` + the first question, after the
        sample's earlier ``(question, answer)`` turns of ``histories`` if given, left-padded;
        decoding stops at the template's stop words or the EOS token, which are cut from the answer.
        """
        processor, tokenizer = self.processor, self.processor.tokenizer
        histories = histories or [[] for _ in questions]
        samples = []
        for image, image_boxes, question, history in zip(images, boxes, questions, histories, strict=True):
            input_ids = processor.generation_prompt(question, with_image=image is not None, history=history)
            sample = {"input_ids": input_ids, "pixel_values": torch.zeros(0, 3, 1, 1), "boxes": []}
            if image is not None:
                pixel_values, mapped = processor.process_image(image, image_boxes)
                sample.update(pixel_values=pixel_values[None], boxes=[mapped])
            samples.append(sample)
        batch = processor.collate(samples, padding_side="left")
        inputs = self.prepare_inputs(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["boxes"],
            padding_side="left",
        )
        stop_words = processor.template.stop_words
        outputs = self.llm(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        attention_mask, position_ids = inputs.attention_mask, inputs.position_ids[:, -1:]
        generated: list[list[int]] = [[] for _ in samples]
        finished = [False] * len(samples)
        for _ in range(max_new_tokens):
            next_tokens = outputs.logits[:, -1].argmax(dim=-1)  # (B,)
            for row, token in enumerate(next_tokens.tolist()):
                if finished[row]:
                    continue
                generated[row].append(token)
                text = tokenizer.decode(generated[row])
                finished[row] = token == tokenizer.eos_token_id or any(w in text for w in stop_words)
            if all(finished):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(samples), 1)], dim=1)
            position_ids = position_ids + 1
            outputs = self.llm(
                input_ids=next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=outputs.cache,
                use_cache=True,
            )
        return [
            _cut_at_stop_words(tokenizer.decode(ids), stop_words, tokenizer.eos_token) for ids in generated
        ]

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

    def export(self, directory: str | Path, box_table: str | Path | None = None) -> Path:
        """Write one self-contained directory that :meth:`from_pretrained` loads::

        llm/                        LLM + tokenizer (save_pretrained)
        clip/                       CLIPVisionModel + CLIPImageProcessor (save_pretrained)
        convnext/                   the open_clip ConvNeXt directory, copied (frozen, unchanged)
        mgllava_projectors.safetensors   fusion, projector, box projector
        mgllava_config.json         ModelConfig with paths relative to the directory
        detector/                   with ``box_table`` (the training boxes): the detector that made
                                    it, weights copied, and detector.json (sha256, parameters);
                                    evaluation detects with it (:mod:`mgllava.eval.boxes`)

        It is written to a hidden directory beside ``directory`` and renamed into place (an
        existing export is renamed aside first, then deleted), so ``directory`` is never
        half-written, even if the process is killed. Leftovers of a killed export are removed.
        """
        from transformers import CLIPImageProcessor

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        for leftover in directory.parent.glob(f".{glob.escape(directory.name)}.*-*"):
            shutil.rmtree(leftover)
        staging = directory.parent / f".{directory.name}.partial-{os.getpid()}"
        try:
            self.llm.save_pretrained(staging / "llm")
            self.processor.tokenizer.save_pretrained(staging / "llm")
            self.low_res_encoder.clip.save_pretrained(staging / "clip")
            CLIPImageProcessor.from_pretrained(self.config.vision.clip_path).save_pretrained(staging / "clip")
            shutil.copytree(self.config.vision.convnext_path, staging / "convnext")
            save_file(self.projector_state_dict(), staging / EXPORT_PROJECTORS)
            config = self.config.model_copy(deep=True)
            config.llm.path, config.vision.clip_path, config.vision.convnext_path = "llm", "clip", "convnext"
            (staging / EXPORT_CONFIG).write_text(config.model_dump_json(indent=2))
            if box_table is not None:
                from mgllava.eval.boxes import EXPORT_DETECTOR_DIR, record_detector

                record_detector(box_table, staging / EXPORT_DETECTOR_DIR)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = directory.parent / f".{directory.name}.old-{os.getpid()}"
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory


def _cut_at_stop_words(text: str, stop_words: tuple[str, ...], eos_token: str | None) -> str:
    """The text before the first stop word or EOS token, stripped."""
    for marker in (*stop_words, *([eos_token] if eos_token else [])):
        text = text.split(marker, 1)[0]
    return text.strip()
