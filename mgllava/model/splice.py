"""Splicing image and object tokens into the LLM input (LLaVA's ``prepare_inputs_labels_for_multimodal``).

The tokenised text carries ``IMAGE_TOKEN_INDEX`` (-200) where ``<image>`` was. For
every such placeholder, in reading order over the batch (sample 0 first), the
sequence receives that image's N fused image tokens followed by its K object
tokens (K may be 0). Labels on those positions are ``IGNORE_INDEX`` (-100), as
are labels on padding. Samples may hold several images or none.

Input padding (left or right) is removed through ``attention_mask``; the spliced
rows are padded again on ``padding_side``: ``right`` for training, ``left`` for
batched generation. Nothing is cut here: the processor sizes the text before the
splice (``max_length`` minus the image tokens, and with
``ModelConfig.object_tokens_in_max_length`` minus the object tokens too), so no
answer token is lost to the visual tokens. Position ids count real
tokens only, so a left-padded row sees the same positions as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


@dataclass
class MultimodalInputs:
    inputs_embeds: torch.Tensor  # (B, T, D)
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    position_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor | None  # (B, T) long, IGNORE_INDEX on image/object/padding positions


def prepare_inputs_labels_for_multimodal(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    image_tokens: list[torch.Tensor],
    object_tokens: list[torch.Tensor],
    padding_side: Literal["right", "left"] = "right",
) -> MultimodalInputs:
    """Build the LLM inputs of a batch.

    ``input_ids``, ``attention_mask``, ``labels``: (B, L), padded on either side.
    ``embed_tokens``: the LLM's input embedding, (B, L) ids -> (B, L, D).
    ``image_tokens``: one (N, D) tensor per placeholder; ``object_tokens``: one (K_i, D)
    tensor per placeholder, in the same order.
    """
    n_placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    if not n_placeholders == len(image_tokens) == len(object_tokens):
        raise ValueError(
            f"{n_placeholders} image placeholders in input_ids but {len(image_tokens)} image and "
            f"{len(object_tokens)} object token tensors"
        )
    text_embeds = embed_tokens(input_ids.clamp(min=0))  # (B, L, D); placeholder rows unused
    visual_tokens = iter(torch.cat([i, o.to(i.dtype)]) for i, o in zip(image_tokens, object_tokens))
    row_embeds, row_labels = [], []
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        ids, embeds = input_ids[row][real], text_embeds[row][real]  # (L_b,), (L_b, D)
        row_label = labels[row][real] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
        embed_pieces, label_pieces, start = [], [], 0
        for position in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
            visual = next(visual_tokens)  # (N + K, D)
            embed_pieces += [embeds[start:position], visual.to(embeds.dtype)]
            label_pieces += [row_label[start:position], ids.new_full((len(visual),), IGNORE_INDEX)]
            start = position + 1
        embed_pieces.append(embeds[start:])
        label_pieces.append(row_label[start:])
        row_embeds.append(torch.cat(embed_pieces))
        row_labels.append(torch.cat(label_pieces))

    batch, length = len(row_embeds), max(len(e) for e in row_embeds)
    inputs_embeds = text_embeds.new_zeros(batch, length, text_embeds.shape[-1])
    new_attention_mask = attention_mask.new_zeros(batch, length)
    new_labels = input_ids.new_full((batch, length), IGNORE_INDEX)
    for row, (embeds, row_label) in enumerate(zip(row_embeds, row_labels)):
        span = slice(length - len(embeds), length) if padding_side == "left" else slice(0, len(embeds))
        inputs_embeds[row, span] = embeds
        new_attention_mask[row, span] = 1
        new_labels[row, span] = row_label
    position_ids = (new_attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    return MultimodalInputs(
        inputs_embeds, new_attention_mask, position_ids, new_labels if labels is not None else None
    )
