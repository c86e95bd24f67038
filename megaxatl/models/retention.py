"""Multi-scale retention (RetNet, Sun et al. 2023; torchscale's MultiScaleRetention).

Projections are shaped as the donor's attention (q_proj (H*hd, D), k_proj / v_proj (KV*hd, D),
o_proj (D, H*hd)) so that XATL can copy W_O (and with attn-init Q/K/V) and a donor's Q/K keep
their meaning: the relative position is the donor's own rotary (HF rotate_half, partial
rotary_pct), in place of RetNet's xPos, which is the same rotation without the length decay
(the decay is gamma). Per head h (0-based) of H:

    gamma_h = 1 - 2**(-5 - h)                      (torchscale; configurable, RetentionConfig)
    S_t = gamma_h S_{t-1} + k_t^T v_t,  o_t = q_t S_t / sqrt(hd)      (q, k rotated; scaling k
                                                                        by hd**-0.5 == scaling q)
    y = o_proj( swish(g_proj x) * GroupNorm_H(o) )

GroupNorm over heads is a per-head LayerNorm without affine (the paper's GroupNorm; it also makes
the output independent of torchscale's per-row decay normalisation, which is omitted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaxatl.models.linear_attn import LinearAttnCache, LinearAttnMixer, repeat_kv, run_form
from megaxatl.models.rotary import Rotary


def retention_log_decay(n_heads: int, base: float = 5.0, span: float | None = None, device=None) -> torch.Tensor:
    """log gamma_h, (H,) fp32: gamma_h = 1 - 2**(-base - h) (torchscale), or spread over `span`."""
    h = torch.arange(n_heads, dtype=torch.float64, device=device)
    expo = base + (h if span is None else h * span / max(n_heads - 1, 1))
    return torch.log1p(-torch.exp2(-expo)).float()


class Retention(LinearAttnMixer):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, rotary_pct: float,
                 rope_theta: float, qkv_bias: bool = False, out_bias: bool = False, form: str = "chunk",
                 chunk_size: int = 64, decay_base: float = 5.0, decay_span: float | None = None,
                 gate: bool = True, norm_eps: float = 1e-5, rope_scaling=None, max_seq_len: int = 2048):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.form, self.chunk_size, self.norm_eps = form, chunk_size, norm_eps
        self.decay_base, self.decay_span = decay_base, decay_span
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.g_proj = nn.Linear(d_model, n_heads * head_dim, bias=False) if gate else None
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        self.rotary = Rotary(int(head_dim * rotary_pct), rope_theta, rope_scaling, max_seq_len)

    def log_decay(self, device=None) -> torch.Tensor:
        return retention_log_decay(self.n_heads, self.decay_base, self.decay_span, device)

    def forward(self, x: torch.Tensor, cache: LinearAttnCache | None = None):
        """x: (B, L, D) -> (B, L, D). With `cache`, x continues the cached sequence."""
        bsz, seqlen, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(bsz, seqlen, H, hd)
        k = self.k_proj(x).view(bsz, seqlen, KV, hd)
        v = self.v_proj(x).view(bsz, seqlen, KV, hd)
        past = cache.pos if cache is not None else 0
        cos, sin = self.rotary.cos_sin(torch.arange(past, past + seqlen, device=x.device))
        # Rotary takes (..., L, hd); here heads follow L, so cos/sin get a head axis
        q, k = self.rotary(q, cos[:, None], sin[:, None]), self.rotary(k, cos[:, None], sin[:, None])
        k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)
        g = self.log_decay(x.device).view(1, 1, H, 1).expand(bsz, seqlen, H, 1)
        o, cache = run_form(self.form, q, k, v, g, hd ** -0.5, self.chunk_size, cache)
        o = F.layer_norm(o.float(), (hd,), eps=self.norm_eps)
        if self.g_proj is not None:
            o = F.silu(self.g_proj(x).float()).view(bsz, seqlen, H, hd) * o
        return self.o_proj(o.reshape(bsz, seqlen, H * hd).to(x.dtype)), cache
