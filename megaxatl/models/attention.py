"""Causal self-attention (MHA / GQA, partial rotary, optional q/k/v bias) on PyTorch SDPA.

Kept as the donor's layers in a hybrid, so its parameters are named and shaped as the canonical
donor state: q_proj (H*hd, D), k_proj / v_proj (KV*hd, D), o_proj (D, H*hd), and with a q/k
norm q_norm / k_norm ((hd,) per head, or (H*hd,) / (KV*hd,) over the whole projection).

What the donor families add, each off by default: a softmax scale other than hd**-0.5, tanh
soft-capping of the scores (then the scores are formed explicitly: SDPA cannot cap), a sliding
window (query t sees keys t - window + 1 .. t, transformers' convention) whose KV cache keeps only
the last window - 1 positions, and RoPE scaling (rotary.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megaxatl.models.norms import make_norm
from megaxatl.models.rotary import Rotary


@dataclass
class KVCache:
    """Keys / values kept for later tokens: (B, KV, T, hd), the last T of the `pos` tokens seen
    (all of them for full attention, at most window - 1 for a sliding window)."""

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0

    @property
    def length(self) -> int:
        return self.k.shape[2]


@dataclass(frozen=True)
class AttentionOptions:
    """The per-family attention settings (ModelConfig fields, see config/schema.py)."""

    rope_scaling: object = None  # RopeScalingConfig or None
    max_seq_len: int = 2048
    window: int | None = None
    scale: float | None = None
    softcap: float | None = None
    qk_norm: str = "none"  # 'none' | 'head' | 'full'
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False


def allowed_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(L, T) bool: query at absolute position q_pos[i] may attend to the key at k_pos[j]."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok = ok & (k_pos[None, :] > q_pos[:, None] - window)
    return ok


def softcapped_attention(q, k, v, allowed, scale: float, softcap: float) -> torch.Tensor:
    """q: (B, H, L, hd), k / v: (B, H, T, hd) -> (B, H, L, hd): softmax(cap * tanh(q.k * scale /
    cap)) v in fp32 statistics, Gemma-2's eager attention."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, rotary_pct: float,
                 rope_theta: float, qkv_bias: bool, out_bias: bool, options: AttentionOptions = AttentionOptions()):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.scale, self.softcap, self.qk_norm = options.window, options.scale, options.softcap, options.qk_norm
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        if options.qk_norm != "none":
            full = options.qk_norm == "full"
            dims = (n_heads * head_dim, n_kv_heads * head_dim) if full else (head_dim, head_dim)
            norm = (options.norm, options.norm_eps, options.norm_unit_offset)
            self.q_norm, self.k_norm = make_norm(norm[0], dims[0], *norm[1:]), make_norm(norm[0], dims[1], *norm[1:])
        self.rotary = Rotary(int(head_dim * rotary_pct), rope_theta, options.rope_scaling, options.max_seq_len)

    def empty_cache(self, batch: int, device, dtype) -> KVCache:
        shape = (batch, self.n_kv_heads, 0, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def _project(self, x: torch.Tensor):
        bsz, seqlen, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":  # OLMo-2: over the whole projection, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":  # Qwen3 / Gemma-3: each head over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        """x: (B, L, D) -> (B, L, D). With `cache`, x continues the cached sequence."""
        bsz, seqlen, _ = x.shape
        q, k, v = self._project(x)
        past = cache.pos if cache is not None else 0
        q_pos = torch.arange(past, past + seqlen, device=x.device)
        cos, sin = self.rotary.cos_sin(q_pos)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        kept = 0
        if cache is not None:
            kept = cache.length
            k, v = torch.cat((cache.k, k), dim=2), torch.cat((cache.v, v), dim=2)
            # a sliding window: later queries never see more than the last window - 1 of these
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            cache = KVCache(k[:, :, k.shape[2] - keep:], v[:, :, k.shape[2] - keep:], past + seqlen)
        y = self._attend(q, k, v, q_pos, torch.arange(past - kept, past + seqlen, device=x.device))
        y = y.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim)
        return self.o_proj(y), cache

    def _attend(self, q, k, v, q_pos, k_pos) -> torch.Tensor:
        seqlen, n_keys = q.shape[2], k.shape[2]
        gqa = self.n_kv_heads != self.n_heads
        if self.softcap is not None:
            if gqa:
                k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
            scale = self.head_dim ** -0.5 if self.scale is None else self.scale
            return softcapped_attention(q, k, v, allowed_keys(q_pos, k_pos, self.window), scale, self.softcap)
        windowed = self.window is not None and n_keys > self.window
        if n_keys == seqlen and not windowed:  # a whole sequence: the plain causal kernel
            mask, causal = None, True
        elif seqlen == 1 and not windowed:  # one new token sees everything kept
            mask, causal = None, False
        else:  # a chunk continuing a cache, or a window shorter than the keys
            mask, causal = allowed_keys(q_pos, k_pos, self.window), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                              enable_gqa=gqa)
