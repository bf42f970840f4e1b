"""The MG-LLaVA model: vision encoders, Conv-Gate fusion, object features, token splice, processor."""

from mgllava.model.boxes import Boxes, filter_boxes, map_boxes_to_frame, prepare_boxes, square_padding
from mgllava.model.fusion import ConvGateFusion
from mgllava.model.modeling_mgllava import MGLLaVA
from mgllava.model.object_features import pool_object_features
from mgllava.model.processing_mgllava import MGLLaVAProcessor
from mgllava.model.projector import MLPProjector
from mgllava.model.splice import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    MultimodalInputs,
    prepare_inputs_labels_for_multimodal,
)
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

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "Boxes",
    "ConvGateFusion",
    "FrozenImageFeatures",
    "HighResEncoder",
    "LowResEncoder",
    "MGLLaVA",
    "MGLLaVAProcessor",
    "MLPProjector",
    "MultimodalInputs",
    "downsample",
    "filter_boxes",
    "image_to_pixel_values",
    "load_high_res_encoder",
    "load_low_res_encoder",
    "map_boxes_to_frame",
    "pad_to_square",
    "pool_object_features",
    "prepare_boxes",
    "random_full_size_encoders",
    "prepare_inputs_labels_for_multimodal",
    "square_padding",
]
