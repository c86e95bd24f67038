"""Rotary position embedding in Hugging Face's rotate_half layout (Llama and GPT-NeoX alike).

Only the first `rot_dim` dims of each head rotate (Pythia: 25% of head_dim); the rest pass through.
"""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, rot_dim: int, theta: float):
        super().__init__()
        self.rot_dim = rot_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
        # a buffer, not a parameter: recomputed from the config, never checkpointed
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (L,) -> cos, sin: (L, rot_dim) in fp32."""
        freqs = torch.outer(positions.float(), self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, L, hd); rotates x[..., :rot_dim]."""
        if self.rot_dim == 0:
            return x
        r = self.rot_dim
        xr, xp = x[..., :r], x[..., r:]
        x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
        rotated = torch.cat((-x2, x1), dim=-1)
        xr = (xr.float() * cos + rotated.float() * sin).to(x.dtype)
        return torch.cat((xr, xp), dim=-1) if xp.shape[-1] else xr
