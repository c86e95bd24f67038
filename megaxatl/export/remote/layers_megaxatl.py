"""The building blocks of an exported megaxatl model (shipped beside modeling_megaxatl.py): the
model settings, norms, MLPs, RoPE with its scalings, and softmax attention with the donor
families' options (q/k norm, softmax scale, soft-capping, sliding window). Imports only torch.

Every function here computes what megaxatl's own modules compute (megaxatl/models): the RoPE
frequencies with the same float32 operations as transformers' rope init functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
_GATED = {"swiglu": F.silu, "geglu_tanh": _ACT["gelu_tanh"]}


class _Section:
    """Attribute access over one section of the megaxatl model config, with its defaults."""

    def __init__(self, values: dict | None, defaults: dict):
        self.__dict__.update(defaults)
        self.__dict__.update(values or {})


_MODEL_DEFAULTS = dict(norm="layernorm", norm_eps=1e-5, mlp="gelu", d_mlp=0, mlp_bias=True, parallel_residual=False,
                       tie_embeddings=False, pad_vocab_multiple=1, n_heads=1, n_kv_heads=None, head_dim=None,
                       rotary_pct=1.0, rope_theta=10000.0, qkv_bias=False, attn_out_bias=False, init_std=0.02,
                       max_seq_len=2048, norm_placement="pre", norm_unit_offset=False, embed_scale=1.0,
                       pos_embed=False, logit_scale=1.0, final_softcap=None, rope_scaling=None, qk_norm="none",
                       attn_scale=None, attn_softcap=None)
_SSM_DEFAULTS = dict(d_state=16, d_conv=4, expand=2.0, conv_bias=True, proj_bias=False)
_SECTION_DEFAULTS = {
    "mamba": dict(_SSM_DEFAULTS, dt_rank=None),
    "mamba2": dict(_SSM_DEFAULTS, d_state=64, head_dim=64, n_groups=1),
    "retention": dict(n_heads=None, norm_eps=1e-5, decay_base=5.0, decay_span=None, gate=True),
    "gla": dict(n_heads=None, norm_eps=1e-5, gate_low_rank_dim=16, gate_logit_normalizer=16.0),
    "local_attention": dict(window=None, rope_theta=None, rope_scaling=None),
}
_ROPE_DEFAULTS = dict(type="none", factor=1.0, original_max_seq_len=None, low_freq_factor=1.0, high_freq_factor=4.0,
                      beta_fast=32.0, beta_slow=1.0, truncate=True, attention_factor=None, mscale=None,
                      mscale_all_dim=None, factors=None)


def model_settings(config) -> _Section:
    m = dict(config.megaxatl_model)
    cfg = _Section({k: v for k, v in m.items() if k not in _SECTION_DEFAULTS}, _MODEL_DEFAULTS)
    for name, defaults in _SECTION_DEFAULTS.items():
        setattr(cfg, name, _Section(m.get(name), defaults))
    cfg.kv_heads = cfg.n_kv_heads or cfg.n_heads
    cfg.attn_head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    cfg.symbols = [c for c in cfg.pattern if c != "|"]
    cfg.mamba2_norm_eps = config.mamba2_norm_eps
    return cfg


def rope_of(cfg: _Section, symbol: str) -> tuple[float, _Section]:
    """(theta, scaling) of an attention layer's RoPE: 'W' layers may have their own."""
    local = cfg.local_attention
    theta, scaling = cfg.rope_theta, cfg.rope_scaling
    if symbol == "W":
        theta = theta if local.rope_theta is None else local.rope_theta
        scaling = scaling if local.rope_scaling is None else local.rope_scaling
    return theta, _Section(scaling, _ROPE_DEFAULTS)


def lin_attn_heads(cfg: _Section, n_heads: int | None) -> tuple[int, int, int]:
    """(heads, KV heads, head_dim) of a retention / GLA mixer: the attention heads unless the
    mixer sets its own head count over the same attention width (then no GQA)."""
    if n_heads is None:
        return cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
    return n_heads, n_heads, cfg.n_heads * cfg.attn_head_dim // n_heads


# ---- norms, MLP ------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """unit_offset: scales by (1 + weight) in fp32 (Gemma's stored convention)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, unit_offset: bool = False) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, unit_offset)
    if kind == "layernorm" and not unit_offset:
        return LayerNorm(dim, eps)
    raise ValueError(f"unknown norm {kind!r} (unit offset {unit_offset})")


class MLP(nn.Module):
    """Gated (down(act(gate(x)) * up(x)): SwiGLU, GeGLU-tanh) or a plain two-layer MLP."""

    def __init__(self, d_model: int, d_mlp: int, kind: str, bias: bool):
        super().__init__()
        self.kind = kind
        if kind in _GATED:
            self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        elif kind not in _ACT:
            raise ValueError(f"unknown mlp {kind!r}")
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in _GATED:
            return self.down_proj(_GATED[self.kind](self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(_ACT[self.kind](self.up_proj(x)))


# ---- RoPE ------------------------------------------------------------------------------------

def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rot_dim: int, theta: float, s: _Section, max_seq_len: int, device=None):
    """(inv_freq (rot_dim / 2,) fp32, cos / sin multiplier) of a RoPE with scaling `s`."""
    if rot_dim == 0:
        return torch.zeros(0, device=device), 1.0
    original = s.original_max_seq_len or max_seq_len
    if s.type == "yarn":
        if s.attention_factor is not None:
            factor_out = s.attention_factor
        elif s.mscale and s.mscale_all_dim:
            factor_out = float(_yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim))
        else:
            factor_out = _yarn_mscale(s.factor)

        def corr(rot: float) -> float:
            return (rot_dim * math.log(original / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr(s.beta_fast), corr(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rot_dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos = theta ** (torch.arange(0, rot_dim, 2).to(dtype=torch.float) / rot_dim)
        extra = 1 - ramp
        inv = (1.0 / (s.factor * pos)) * (1 - extra) + (1.0 / pos) * extra
        return inv.to(device), factor_out
    inv = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if s.type == "linear":
        inv = inv / s.factor
    elif s.type == "llama3":
        low_wl, high_wl = original / s.low_freq_factor, original / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / s.factor, inv)
        smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * inv_l / s.factor + smooth * inv_l
        inv = torch.where(~(wavelen < high_wl) * ~(wavelen > low_wl), smoothed, inv_l)
    elif s.type == "factors":
        inv = inv / torch.tensor(s.factors, dtype=torch.float32)
    elif s.type != "none":
        raise ValueError(f"unknown RoPE scaling {s.type!r}")
    return inv.to(device), 1.0


def rotary_at(rot_dim: int, theta: float, scaling: _Section, max_seq_len: int, offset: int, seqlen: int, device):
    """cos, sin: (L, rot_dim) fp32 of positions offset .. offset + seqlen - 1 (rotate_half layout)."""
    inv_freq, factor = rope_frequencies(rot_dim, theta, scaling, max_seq_len, device)
    freqs = torch.outer(torch.arange(offset, offset + seqlen, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    if factor != 1.0:
        return emb.cos() * factor, emb.sin() * factor
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x[..., :rot_dim] (rot_dim = cos.shape[-1]); cos / sin broadcast against x."""
    r = cos.shape[-1]
    if r == 0:
        return x
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    xr = (xr.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat((xr, xp), dim=-1) if xp.shape[-1] else xr


def real_positions(mask: torch.Tensor | None, seqlen: int) -> torch.Tensor | None:
    """(B, L, 1) fp32: 1 at the last L positions' real tokens, 0 at padding (None: no padding)."""
    return None if mask is None else mask[:, -seqlen:, None].float()


# ---- softmax attention -----------------------------------------------------------------------

class Attention(nn.Module):
    """Full ('*') or sliding-window ('W') softmax attention; with a state, the KV cache (a window
    keeps only its last window - 1 positions)."""

    def __init__(self, cfg: _Section, symbol: str = "*"):
        super().__init__()
        D, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, KV, hd
        self.rot_dim, self.max_seq_len = int(hd * cfg.rotary_pct), cfg.max_seq_len
        self.theta, self.scaling = rope_of(cfg, symbol)
        self.window = cfg.local_attention.window if symbol == "W" else None
        self.scale = hd ** -0.5 if cfg.attn_scale is None else cfg.attn_scale
        self.softcap, self.qk_norm = cfg.attn_softcap, cfg.qk_norm
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, KV * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, KV * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.attn_out_bias)
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            norm = (cfg.norm, cfg.norm_eps, cfg.norm_unit_offset)
            self.q_norm = make_norm(norm[0], H * hd if full else hd, *norm[1:])
            self.k_norm = make_norm(norm[0], KV * hd if full else hd, *norm[1:])

    def forward(self, x: torch.Tensor, state: dict | None = None, offset: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, D) at positions offset.. -> (B, L, D). state: the KV cache (updated). mask:
        (B, offset + L), 0 at padding: no query attends to a padding key but its own."""
        bsz, seqlen, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary_at(self.rot_dim, self.theta, self.scaling, self.max_seq_len, offset, seqlen, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is not None:
            if "k" in state:
                k, v = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            state["k"], state["v"] = k[:, :, k.shape[2] - keep:], v[:, :, k.shape[2] - keep:]
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        n_keys = k.shape[2]
        q_pos = torch.arange(offset, offset + seqlen, device=x.device)
        k_pos = torch.arange(offset + seqlen - n_keys, offset + seqlen, device=x.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - self.window)
        if mask is not None:
            # a padding query whose window holds only padding keeps its own key (no NaN)
            own = k_pos[None, :] == q_pos[:, None]
            allowed = (allowed & mask[:, None, None, -n_keys:].bool()) | own
        scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = torch.matmul(probs, v.float()).to(x.dtype)
        return self.o_proj(y.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim))
