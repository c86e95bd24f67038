"""The XATL block: norm -> token mixer -> residual, norm -> MLP -> residual.

The mixer sits in the attention slot of the donor's block, so norms and MLP keep the donor's
shape and can be copied. GPT-NeoX's parallel residual form is x + mixer(norm1(x)) + mlp(norm2(x)).
`model.norm_placement` puts the norms where the donor has them, for every mixer alike:

    pre        x + f(norm(x))                 norm1, norm2                      (GPT-2, Llama, ...)
    post       x + post_norm(f(x))            post_norm1, post_norm2            (OLMo-2)
    sandwich   x + post_norm(f(norm(x)))      norm1, post_norm1, norm2, post_norm2  (Gemma-2/3)
"""

from __future__ import annotations

import torch
from torch import nn

from megaxatl.config.schema import ModelConfig
from megaxatl.models.attention import Attention, AttentionOptions
from megaxatl.models.gla import GLA
from megaxatl.models.mamba import Mamba
from megaxatl.models.mamba2 import Mamba2
from megaxatl.models.mlp import MLP
from megaxatl.models.norms import make_norm
from megaxatl.models.retention import Retention
from megaxatl.config.pattern import MIXERS


def attention_options(symbol: str, cfg: ModelConfig) -> AttentionOptions:
    _, scaling = cfg.rope_of(symbol)
    return AttentionOptions(rope_scaling=scaling, max_seq_len=cfg.max_seq_len, window=cfg.window_of(symbol),
                            scale=cfg.attn_scale, softcap=cfg.attn_softcap, qk_norm=cfg.qk_norm, norm=cfg.norm,
                            norm_eps=cfg.norm_eps, norm_unit_offset=cfg.norm_unit_offset)


def make_mixer(symbol: str, cfg: ModelConfig) -> nn.Module:
    kind = MIXERS[symbol]
    if kind in ("attention", "sliding_attention"):
        return Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim, cfg.rotary_pct,
                         cfg.rope_of(symbol)[0], cfg.qkv_bias, cfg.attn_out_bias, attention_options(symbol, cfg))
    if kind == "mamba":
        m = cfg.mamba
        return Mamba(cfg.d_model, m.d_state, m.d_conv, m.expand, m.dt_rank, m.dt_min, m.dt_max,
                     m.dt_init_floor, m.conv_bias, m.proj_bias)
    if kind == "mamba2":
        m = cfg.mamba2
        return Mamba2(cfg.d_model, m.d_state, m.d_conv, m.expand, m.head_dim, m.n_groups, m.chunk_size,
                      m.dt_min, m.dt_max, m.dt_init_floor, m.conv_bias, m.proj_bias)
    if kind == "retention":
        r = cfg.retention
        return Retention(cfg.d_model, *cfg.lin_attn_heads(r.n_heads), cfg.rotary_pct, cfg.rope_theta,
                         cfg.qkv_bias, cfg.attn_out_bias, r.form, r.chunk_size, r.decay_base, r.decay_span, r.gate,
                         r.norm_eps, rope_scaling=cfg.rope_scaling, max_seq_len=cfg.max_seq_len)
    if kind == "gla":
        g = cfg.gla
        return GLA(cfg.d_model, *cfg.lin_attn_heads(g.n_heads), cfg.qkv_bias, cfg.attn_out_bias,
                   g.form, g.chunk_size, g.gate_low_rank_dim, g.gate_logit_normalizer, g.norm_eps)
    raise NotImplementedError(f"mixer '{kind}' (pattern symbol '{symbol}') is not implemented yet")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    def __init__(self, symbol: str, cfg: ModelConfig):
        super().__init__()
        self.symbol = symbol
        self.parallel_residual = cfg.parallel_residual
        pre, post = cfg.norm_placement in ("pre", "sandwich"), cfg.norm_placement in ("post", "sandwich")

        def norm(present: bool):
            return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset) if present else None

        self.norm1 = norm(pre)
        self.mixer = make_mixer(symbol, cfg)
        self.post_norm1 = norm(post)
        has_mlp = cfg.mlp != "none"
        self.norm2 = norm(pre and has_mlp)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.mlp, cfg.mlp_bias) if has_mlp else None
        self.post_norm2 = norm(post and has_mlp)

    def empty_cache(self, batch: int, device, dtype):
        return self.mixer.empty_cache(batch, device, dtype)

    @staticmethod
    def _or_identity(norm):
        return _identity if norm is None else norm

    def forward(self, x: torch.Tensor, cache=None):
        """x: (B, L, D) -> (out (B, L, D), new cache or None)."""
        n1, p1 = self._or_identity(self.norm1), self._or_identity(self.post_norm1)
        h, cache = self.mixer(n1(x), cache)
        h = p1(h)
        if self.mlp is None:
            return x + h, cache
        n2, p2 = self._or_identity(self.norm2), self._or_identity(self.post_norm2)
        if self.parallel_residual:
            return x + h + self.mlp(n2(x)), cache
        x = x + h
        return x + p2(self.mlp(n2(x))), cache
