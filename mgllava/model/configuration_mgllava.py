"""``MGLLaVAConfig``: everything needed to build an MG-LLaVA without its weights.

A composite Hugging Face config (``model_type = "mgllava"``):

- ``text_config``: the LLM's config (any ``AutoModelForCausalLM`` architecture);
- ``vision_config``: the low-res tower's ``CLIPVisionConfig``;
- ``convnext_config``: the high-res tower's ``open_clip_config.json`` (a dict: ``model_cfg``,
  ``preprocess_cfg``), from which the timm ConvNeXt trunk is built;
- the MG-LLaVA fields of :class:`mgllava.config.ModelConfig` (the variant's ``granularities``, input
  sides, CLIP layer, object features, box filtering, text budget) and the two placeholder ids of the
  expanded text. ``granularities`` records the ablation variant (``["low", "high", "objects"]``, the
  default and what an export without the key is: MG-LLaVA; ``["low"]``: LLaVA-1.5, and so on).

Placeholder ids are negative, so they can never be real vocabulary ids; the model maps them to
id 0 before its embedding lookup and overwrites those rows with image and object tokens.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from mgllava.config import GRANULARITIES

if TYPE_CHECKING:
    from mgllava.config import ModelConfig

IMAGE_TOKEN_INDEX = -200  # one per image token after expansion (one per image before it)
OBJECT_TOKEN_INDEX = -201  # one per object token (one per kept box)


class MGLLaVAConfig(PreTrainedConfig):
    model_type = "mgllava"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    convnext_config: dict | None = None  # open_clip_config.json of the ConvNeXt checkpoint
    template: str = "vicuna"
    granularities: list[str] | None = None  # None: all three, MG-LLaVA
    high_res: int = 768
    low_res: int = 336
    select_layer: int = -2
    object_features: str = "direct"
    roi_output: int = 56
    roi_aligned: bool = False
    nms_iou: float = 0.2
    box_cap_threshold: int = 100
    boxes_per_category: int = 20
    max_length: int = 2048
    object_tokens_in_max_length: bool = False
    image_token_id: int = IMAGE_TOKEN_INDEX
    object_token_id: int = OBJECT_TOKEN_INDEX
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # sub-configs given as objects are copied: setting this config's attention kernel sets theirs too
        # (transformers recurses into sub-configs), which would reset a loaded tower's kernel to None (eager)
        for key in self.sub_configs_defaults:
            if isinstance(getattr(self, key), PreTrainedConfig):
                setattr(self, key, copy.deepcopy(getattr(self, key)))
        super().__post_init__(**kwargs)
        self.granularities = list(self.granularities or GRANULARITIES)
        self.tie_word_embeddings = self.tie_word_embeddings or bool(self.text_config.tie_word_embeddings)

    @property
    def image_seq_length(self) -> int:
        """N: image tokens per image, (low_res / patch)^2 of the CLIP tower."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @classmethod
    def from_model_config(cls, model_config) -> MGLLaVAConfig:
        """From a :class:`mgllava.config.ModelConfig`: the sub-configs read from its local checkpoints."""
        return cls(
            text_config=AutoConfig.from_pretrained(model_config.llm.path),
            vision_config=CLIPVisionConfig.from_pretrained(model_config.vision.clip_path),
            convnext_config=json.loads((Path(model_config.vision.convnext_path) / "open_clip_config.json").read_text()),
            template=model_config.llm.template,
            granularities=list(model_config.granularities),
            high_res=model_config.vision.high_res,
            low_res=model_config.vision.low_res,
            select_layer=model_config.vision.select_layer,
            object_features=model_config.object_features,
            roi_output=model_config.roi_output,
            roi_aligned=model_config.roi_aligned,
            nms_iou=model_config.nms_iou,
            box_cap_threshold=model_config.box_cap_threshold,
            boxes_per_category=model_config.boxes_per_category,
            max_length=model_config.max_length,
            object_tokens_in_max_length=model_config.object_tokens_in_max_length,
        )


EXPORT_CONFIG = "config.json"  # an export's config (transformers' CONFIG_NAME)
LEGACY_EXPORT_CONFIG = "mgllava_config.json"  # a legacy export's config (ModelConfig)


def legacy_model_config(directory) -> ModelConfig | None:
    """The :class:`~mgllava.config.ModelConfig` of a legacy export directory (``mgllava_config.json``, paths
    relative to it, made absolute), or None when ``directory`` is not one."""
    from mgllava.config import ModelConfig

    directory = Path(directory)
    if not (directory / LEGACY_EXPORT_CONFIG).is_file() or (directory / EXPORT_CONFIG).is_file():
        return None
    tree = json.loads((directory / LEGACY_EXPORT_CONFIG).read_text())
    tree["llm"]["path"] = str(directory / tree["llm"]["path"])
    for key in ("clip_path", "convnext_path"):
        tree["vision"][key] = str(directory / tree["vision"][key])
    return ModelConfig.model_validate(tree)
