"""Conv-Gate fusion of the low-res ViT tokens with the high-res ConvNeXt map (SPEC section 3).

::

    H' = proj_h(GELU(conv1x1_h(H)))                  -> tokens (B, N, d)
    L' = L_map + proj_l(GELU(dwconv7x7(L_map)))      -> tokens (B, N, d)
    g  = gate(mean_over_tokens(concat(L', H')))      one scalar per image
    out = L' + tanh(g) * H'

``proj_h`` and ``proj_l`` start at zero, so at initialisation the module is exactly
the identity on ``L``; ``conv1x1_h`` and ``dwconv7x7`` are Xavier-uniform with zero
bias. The gate MLP keeps PyTorch's default ``nn.Linear`` initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvGateFusion(nn.Module):
    def __init__(self, low_dim: int, high_dim: int):
        super().__init__()
        self.conv1x1_h = nn.Conv2d(high_dim, high_dim, kernel_size=1)
        self.proj_h = nn.Conv2d(high_dim, low_dim, kernel_size=1)
        self.dwconv7x7 = nn.Conv2d(low_dim, low_dim, kernel_size=7, padding=3, groups=low_dim)
        self.proj_l = nn.Conv2d(low_dim, low_dim, kernel_size=1)
        self.gate = nn.Sequential(nn.Linear(2 * low_dim, low_dim // 2), nn.GELU(), nn.Linear(low_dim // 2, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.conv1x1_h, self.dwconv7x7):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        for conv in (self.proj_h, self.proj_l):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, low_tokens: torch.Tensor, high_map: torch.Tensor) -> torch.Tensor:
        """Fuse ``low_tokens`` (B, N, d), N = h*w on a square grid, with ``high_map`` (B, C, h', w').

        If the high-res grid (h', w') differs from the low-res grid (h, w), ``high_map`` is
        first resized to (h, w) bilinearly (``align_corners=False``). Returns (B, N, d).
        """
        batch, n_tokens, dim = low_tokens.shape
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"ConvGateFusion needs a square token grid, got N={n_tokens}")
        if high_map.shape[-2:] != (side, side):
            high_map = F.interpolate(high_map, size=(side, side), mode="bilinear", align_corners=False)
        high = self.proj_h(F.gelu(self.conv1x1_h(high_map)))  # (B, d, h, w)
        high_tokens = high.flatten(2).transpose(1, 2)  # (B, N, d)
        low_map = low_tokens.transpose(1, 2).reshape(batch, dim, side, side)  # (B, d, h, w)
        low_map = low_map + self.proj_l(F.gelu(self.dwconv7x7(low_map)))
        low_tokens = low_map.flatten(2).transpose(1, 2)  # (B, N, d)
        gate = self.gate(torch.cat([low_tokens, high_tokens], dim=-1).mean(dim=1))  # (B, 1)
        return low_tokens + torch.tanh(gate).unsqueeze(1) * high_tokens
