"""Causal self-attention (MHA / GQA, partial rotary, optional q/k/v bias) on PyTorch SDPA.

Kept as the donor's layers in a hybrid, so its parameters are named and shaped as the canonical
donor state: q_proj (H*hd, D), k_proj / v_proj (KV*hd, D), o_proj (D, H*hd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megaxatl.models.rotary import Rotary


@dataclass
class KVCache:
    """Keys / values seen so far: (B, KV, T, hd). Attention layers are the only growing state."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, rotary_pct: float,
                 rope_theta: float, qkv_bias: bool, out_bias: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        self.rotary = Rotary(int(head_dim * rotary_pct), rope_theta)

    def empty_cache(self, batch: int, device, dtype) -> KVCache:
        shape = (batch, self.n_kv_heads, 0, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        """x: (B, L, D) -> (B, L, D). With `cache`, x continues the cached sequence."""
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        past = cache.length if cache is not None else 0
        cos, sin = self.rotary.cos_sin(torch.arange(past, past + seqlen, device=x.device))
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        if cache is not None:
            k = torch.cat((cache.k, k), dim=2)
            v = torch.cat((cache.v, v), dim=2)
            cache = KVCache(k, v)
        if past == 0:
            mask, causal = None, True
        elif seqlen == 1:
            mask, causal = None, False
        else:  # a chunk continuing a cache: query i sees keys up to past + i
            qi = torch.arange(past, past + seqlen, device=x.device)[:, None]
            mask, causal = torch.arange(past + seqlen, device=x.device)[None, :] <= qi, False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim)
        return self.o_proj(y), cache
