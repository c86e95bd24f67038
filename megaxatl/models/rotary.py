"""Rotary position embedding in Hugging Face's rotate_half layout (Llama and GPT-NeoX alike).

Only the first `rot_dim` dims of each head rotate (Pythia: 25% of head_dim); the rest pass through.
The frequencies follow `model.rope_scaling` (config/schema.py RopeScalingConfig), computed with
the same float32 operations, in the same order, as transformers' rope init functions
(modeling_rope_utils), so a donor's positions mean exactly what they meant to it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _plain(rot_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))


def _llama3(inv_freq: torch.Tensor, s, old_context_len: int) -> torch.Tensor:
    low_freq_wavelen = old_context_len / s.low_freq_factor
    high_freq_wavelen = old_context_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / s.factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rot_dim: int, theta: float, s, original: int) -> tuple[torch.Tensor, float]:
    factor, dim = s.factor, rot_dim
    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = float(yarn_mscale(factor, s.mscale) / yarn_mscale(factor, s.mscale_all_dim))
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def rope_frequencies(rot_dim: int, theta: float, scaling=None, max_seq_len: int = 2048) -> tuple[torch.Tensor, float]:
    """(inv_freq (rot_dim / 2,) fp32, attention factor multiplying cos and sin) of a RoPE with
    base `theta` and `scaling` (a RopeScalingConfig or None for plain)."""
    kind = "none" if scaling is None else scaling.type
    if rot_dim == 0:
        return torch.zeros(0), 1.0
    original = (scaling.original_max_seq_len or max_seq_len) if scaling is not None else max_seq_len
    if kind == "yarn":
        return _yarn(rot_dim, theta, scaling, original)
    inv_freq = _plain(rot_dim, theta)
    if kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling, original)
    elif kind == "factors":
        inv_freq = inv_freq / torch.tensor(scaling.factors, dtype=torch.float32)
    elif kind != "none":
        raise ValueError(f"unknown RoPE scaling {kind!r}")
    return inv_freq, 1.0


class Rotary(nn.Module):
    def __init__(self, rot_dim: int, theta: float, scaling=None, max_seq_len: int = 2048):
        super().__init__()
        self.rot_dim = rot_dim
        inv_freq, self.attention_factor = rope_frequencies(rot_dim, theta, scaling, max_seq_len)
        # a buffer, not a parameter: recomputed from the config, never checkpointed
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (L,) -> cos, sin: (L, rot_dim) in fp32."""
        freqs = torch.outer(positions.float(), self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.attention_factor != 1.0:  # YaRN: the same product transformers forms
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
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
