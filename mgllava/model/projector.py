"""The two-layer MLP that maps vision features into the LLM's embedding space.

Used twice (SPEC sections 2 and 4): the image projector (d -> D) after the
fusion, and the box projector (C_total -> D) after RoIAlign pooling.
"""

from __future__ import annotations

from torch import nn


class MLPProjector(nn.Sequential):
    """Linear(in_dim -> out_dim), GELU, Linear(out_dim -> out_dim); (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
