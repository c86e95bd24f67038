"""The XATL block: norm -> token mixer -> residual, norm -> MLP -> residual.

The mixer sits in the attention slot of the donor's block, so norms and MLP keep the donor's
shape and can be copied. GPT-NeoX's parallel residual form is x + mixer(norm1(x)) + mlp(norm2(x)).
"""

from __future__ import annotations

import torch
from torch import nn

from megaxatl.config.schema import ModelConfig
from megaxatl.models.attention import Attention
from megaxatl.models.gla import GLA
from megaxatl.models.mamba import Mamba
from megaxatl.models.mamba2 import Mamba2
from megaxatl.models.mlp import MLP
from megaxatl.models.norms import make_norm
from megaxatl.models.retention import Retention
from megaxatl.config.pattern import MIXERS


def make_mixer(symbol: str, cfg: ModelConfig) -> nn.Module:
    kind = MIXERS[symbol]
    if kind == "attention":
        return Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim, cfg.rotary_pct,
                         cfg.rope_theta, cfg.qkv_bias, cfg.attn_out_bias)
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
                         r.norm_eps)
    if kind == "gla":
        g = cfg.gla
        return GLA(cfg.d_model, *cfg.lin_attn_heads(g.n_heads), cfg.qkv_bias, cfg.attn_out_bias,
                   g.form, g.chunk_size, g.gate_low_rank_dim, g.gate_logit_normalizer, g.norm_eps)
    raise NotImplementedError(f"mixer '{kind}' (pattern symbol '{symbol}') is not implemented yet")


class Block(nn.Module):
    def __init__(self, symbol: str, cfg: ModelConfig):
        super().__init__()
        self.symbol = symbol
        self.parallel_residual = cfg.parallel_residual
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mixer = make_mixer(symbol, cfg)
        if cfg.mlp != "none":
            self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
            self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.mlp, cfg.mlp_bias)
        else:
            self.norm2 = self.mlp = None

    def empty_cache(self, batch: int, device, dtype):
        return self.mixer.empty_cache(batch, device, dtype)

    def forward(self, x: torch.Tensor, cache=None):
        """x: (B, L, D) -> (out (B, L, D), new cache or None)."""
        h, cache = self.mixer(self.norm1(x), cache)
        if self.mlp is None:
            return x + h, cache
        if self.parallel_residual:
            return x + h + self.mlp(self.norm2(x)), cache
        x = x + h
        return x + self.mlp(self.norm2(x)), cache
