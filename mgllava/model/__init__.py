"""The MG-LLaVA model in Hugging Face's conventions: config, model, processor; vision encoders, Conv-Gate
fusion, object features.

Importing this package registers ``MGLLaVAConfig`` (``model_type = "mgllava"``) with ``AutoConfig``,
the model with ``AutoModelForImageTextToText`` and the processor with ``AutoProcessor`` (``import
mgllava`` does it as soon as transformers is imported)."""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from mgllava.model.boxes import Boxes, filter_boxes, map_boxes_to_frame, prepare_boxes, square_padding
from mgllava.model.configuration_mgllava import IMAGE_TOKEN_INDEX, OBJECT_TOKEN_INDEX, MGLLaVAConfig
from mgllava.model.fusion import ConvGateFusion
from mgllava.model.modeling_mgllava import MGLLaVAForConditionalGeneration, answer_questions, upgrade_export
from mgllava.model.object_features import pool_object_features
from mgllava.model.processing_mgllava import IGNORE_INDEX, MGLLaVAProcessor
from mgllava.model.projector import MLPProjector
from mgllava.model.vision import (
    FrozenImageFeatures,
    HighResEncoder,
    LowResEncoder,
    downsample,
    image_to_pixel_values,
    load_high_res_encoder,
    load_low_res_encoder,
    pad_to_square,
    random_full_size_encoders,
)

AutoConfig.register(MGLLaVAConfig.model_type, MGLLaVAConfig, exist_ok=True)
AutoModelForImageTextToText.register(MGLLaVAConfig, MGLLaVAForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MGLLaVAConfig, MGLLaVAProcessor, exist_ok=True)

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "OBJECT_TOKEN_INDEX",
    "Boxes",
    "ConvGateFusion",
    "FrozenImageFeatures",
    "HighResEncoder",
    "LowResEncoder",
    "MGLLaVAConfig",
    "MGLLaVAForConditionalGeneration",
    "MGLLaVAProcessor",
    "MLPProjector",
    "downsample",
    "filter_boxes",
    "answer_questions",
    "image_to_pixel_values",
    "load_high_res_encoder",
    "load_low_res_encoder",
    "map_boxes_to_frame",
    "pad_to_square",
    "pool_object_features",
    "prepare_boxes",
    "random_full_size_encoders",
    "square_padding",
    "upgrade_export",
]
