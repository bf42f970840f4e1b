"""The two frozen image encoders and the image preprocessing they share (SPEC section 2).

One image becomes one high-res tensor; the low-res input is derived from it:

- pad to a square with the CLIP mean colour, the image centred
  (:func:`pad_to_square`, the geometry of :func:`mgllava.model.boxes.square_padding`);
- resize to ``high_res`` (bicubic, as ``CLIPImageProcessor``), CLIP mean/std
  normalisation: ``pixel_values`` (3, high_res, high_res);
- low-res input: a bilinear (``align_corners=False``) downsample of that
  normalised tensor to ``low_res`` (:func:`downsample`, done on the batch in the model).

Encoders:

- :class:`LowResEncoder`: a transformers ``CLIPVisionModel``; the hidden states of
  layer ``select_layer`` (-2: the penultimate) without the CLS token,
  (B, N, d) with N = (low_res / patch)^2;
- :class:`HighResEncoder`: the timm ConvNeXt trunk of an open_clip model
  (``model.visual.trunk``); the outputs of its four stages, at strides 4/8/16/32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mgllava.model.boxes import square_padding

OPEN_CLIP_LOCAL_DIR = "local-dir:"


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre ``image`` on a square canvas of colour ``fill`` (RGB 0-255)."""
    image = image.convert("RGB")
    side, left, top = square_padding(*image.size)
    if image.width == image.height:
        return image
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, (left, top))
    return canvas


def image_to_pixel_values(
    image: Image.Image, high_res: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Pad, resize and normalise one image: (3, high_res, high_res) float32."""
    fill = tuple(round(255 * m) for m in mean)
    square = pad_to_square(image, fill).resize((high_res, high_res), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(high_res, high_res, 3).permute(2, 0, 1).contiguous().float() / 255  # (3, H, H) in [0, 1]
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def downsample(pixel_values: torch.Tensor, low_res: int) -> torch.Tensor:
    """(B, 3, H, H) -> (B, 3, low_res, low_res), bilinear, ``align_corners=False``."""
    return F.interpolate(pixel_values, size=(low_res, low_res), mode="bilinear", align_corners=False)


class LowResEncoder(nn.Module):
    """CLIP ViT tokens of one hidden layer, CLS dropped."""

    def __init__(self, clip, select_layer: int = -2):
        super().__init__()
        self.clip = clip  # transformers CLIPVisionModel
        self.select_layer = select_layer
        config = clip.config
        self.hidden_size: int = config.hidden_size
        self.grid: int = config.image_size // config.patch_size  # tokens per side

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, low_res, low_res) -> (B, grid*grid, hidden_size)."""
        outputs = self.clip(pixel_values, output_hidden_states=True)
        return outputs.hidden_states[self.select_layer][:, 1:]


class HighResEncoder(nn.Module):
    """The four stage maps of a timm ConvNeXt trunk."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk  # timm ConvNeXt (open_clip ``model.visual.trunk``)
        self.stage_channels: list[int] = [info["num_chs"] for info in trunk.feature_info[-4:]]
        self.stage_strides: list[int] = [info["reduction"] for info in trunk.feature_info[-4:]]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, H) -> [(B, C_s, H / stride_s, H / stride_s) for the 4 stages]."""
        return self.trunk.forward_intermediates(pixel_values, intermediates_only=True)


@dataclass
class FrozenImageFeatures:
    """The frozen encoders' outputs for B images, as far as the trainable modules read them."""

    low_tokens: torch.Tensor  # (B, N, d): CLIP tokens
    high_map: torch.Tensor | None  # (B, C_4, h, w): the last ConvNeXt stage, fused in by the Conv-Gate (None: no fusion)
    box_features: list[torch.Tensor]  # B x (K_i, C_total): RoI features over all four stages (K_i = 0: none)

    def __len__(self) -> int:
        return len(self.low_tokens)

    @property
    def nbytes(self) -> int:
        high = 0 if self.high_map is None else self.high_map.nbytes
        return self.low_tokens.nbytes + high + sum(f.nbytes for f in self.box_features)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FrozenImageFeatures:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype or tensor.dtype)

        return FrozenImageFeatures(move(self.low_tokens), move(self.high_map), [move(f) for f in self.box_features])

    def unbind(self) -> list[FrozenImageFeatures]:
        """One single-image (B = 1) copy per image, detached from this batch's storage."""
        highs = [None] * len(self) if self.high_map is None else [high[None].clone() for high in self.high_map]
        return [
            FrozenImageFeatures(low[None].clone(), high, [boxes.clone()])
            for low, high, boxes in zip(self.low_tokens, highs, self.box_features)
        ]

    @classmethod
    def cat(cls, items: list[FrozenImageFeatures]) -> FrozenImageFeatures:
        highs = [f.high_map for f in items]
        return cls(
            torch.cat([f.low_tokens for f in items]),
            None if highs[0] is None else torch.cat(highs),
            [boxes for f in items for boxes in f.box_features],
        )


def load_low_res_encoder(clip_path: str | Path, select_layer: int) -> LowResEncoder:
    """A ``CLIPVisionModel`` from a local Hugging Face directory (vision part of a full CLIP too)."""
    from transformers import CLIPVisionModel

    return LowResEncoder(CLIPVisionModel.from_pretrained(str(clip_path)), select_layer)


def build_high_res_encoder(convnext_config: dict) -> HighResEncoder:
    """The ConvNeXt trunk described by an ``open_clip_config.json`` (a dict), randomly initialised
    (weights come from the checkpoint that is loaded next); no text tower is built."""
    from open_clip.model import _build_vision_tower

    model_cfg = convnext_config["model_cfg"]
    return HighResEncoder(_build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"]).trunk)


def load_high_res_encoder(convnext_path: str | Path) -> HighResEncoder:
    """The ConvNeXt trunk of an open_clip checkpoint directory (``open_clip_config.json`` + weights).

    open_clip loads the weights with safetensors or ``torch.load(weights_only=True)``;
    the text tower is built, loaded and then dropped.
    """
    import open_clip

    model = open_clip.create_model(OPEN_CLIP_LOCAL_DIR + str(convnext_path), pretrained=None)
    return HighResEncoder(model.visual.trunk)


def random_full_size_encoders(select_layer: int = -2) -> tuple[LowResEncoder, HighResEncoder]:
    """The full-size towers of SPEC section 2 with random weights (no download): CLIP ViT-L/14-336
    and the ConvNeXt trunk of OpenCLIP ``convnext_large_d_320``; for shape checks and benchmarks."""
    import open_clip
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        )
    )
    trunk = open_clip.create_model("convnext_large_d_320", pretrained=None).visual.trunk
    return LowResEncoder(clip, select_layer), HighResEncoder(trunk)


def load_image_normalisation(clip_path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` from the CLIP directory's ``CLIPImageProcessor``."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(str(clip_path))
    return tuple(processor.image_mean), tuple(processor.image_std)
