"""Gated linear attention (Yang et al. 2023), flash-linear-attention's GatedLinearAttention layout.

q_proj (H*hd, D), k_proj / v_proj (KV*hd, D), o_proj (D, H*hd) as the donor's attention (so XATL
copies W_O, and with attn-init Q/K/V); g_proj (H*hd, D) the output gate; gk_proj a low-rank
forget gate: gk_proj.0 (r, D) no bias, gk_proj.1 (KV*hd, r) with bias; g_norm.weight (hd,).

    gk_t = logsigmoid(gk_proj(x_t)) / 16                (per key dim, <= 0; fla's normaliser)
    S_t  = diag(exp(gk_t)) S_{t-1} + k_t^T v_t,   o_t = q_t S_t / sqrt(hd)
    y    = o_proj( RMSNorm_head(o) * g_norm.weight * swish(g_proj x) )

No positional encoding (GLA's decay is its position signal), as fla.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaxatl.models.linear_attn import LinearAttnCache, LinearAttnMixer, repeat_kv, run_form
from megaxatl.models.params import mark_no_decay


class GLA(LinearAttnMixer):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool = False,
                 out_bias: bool = False, form: str = "chunk", chunk_size: int = 16, gate_low_rank_dim: int = 16,
                 gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.form, self.chunk_size, self.norm_eps = form, chunk_size, norm_eps
        self.gate_logit_normalizer = gate_logit_normalizer
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.g_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, n_kv_heads * head_dim, bias=True))
        self.g_norm = nn.Module()
        self.g_norm.weight = mark_no_decay(nn.Parameter(torch.ones(head_dim)))
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)

    def forward(self, x: torch.Tensor, cache: LinearAttnCache | None = None):
        """x: (B, L, D) -> (B, L, D). With `cache`, x continues the cached sequence."""
        bsz, seqlen, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        rep = H // KV
        q = self.q_proj(x).view(bsz, seqlen, H, hd)
        k = repeat_kv(self.k_proj(x).view(bsz, seqlen, KV, hd), rep)
        v = repeat_kv(self.v_proj(x).view(bsz, seqlen, KV, hd), rep)
        gk = F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer
        gk = repeat_kv(gk.view(bsz, seqlen, KV, hd), rep)
        o, cache = run_form(self.form, q, k, v, gk, hd ** -0.5, self.chunk_size, cache)
        o = o.float()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.g_norm.weight.float()
        o = o * F.silu(self.g_proj(x).float()).view(bsz, seqlen, H, hd)
        return self.o_proj(o.reshape(bsz, seqlen, H * hd).to(x.dtype)), cache
