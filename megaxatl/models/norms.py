"""LayerNorm / RMSNorm (computed in fp32) and Mamba-2's gated, group-wise RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaxatl.models.params import mark_no_decay


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. unit_offset: Gemma's convention, scaling by (1 + weight) in fp32
    before the cast back (its weights are stored that way and start at 0)."""

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = mark_no_decay(nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, as Llama's reference does, then cast back before the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)
        mark_no_decay(self.weight)
        mark_no_decay(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, unit_offset: bool = False) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, unit_offset)
    if unit_offset:
        raise ValueError(f"norm '{kind}' has no unit-offset form")
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    raise ValueError(f"unknown norm '{kind}'")


class GatedRMSNorm(nn.Module):
    """mamba-ssm's RMSNormGated with norm_before_gate=False: rmsnorm(y * silu(z)) per group.

    y, z: (..., d). Statistics are taken over groups of `group_size` channels (d / n_groups), so
    the result does not change when heads (and their groups) are split across TP ranks.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = mark_no_decay(nn.Parameter(torch.ones(dim)))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        g = h.unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.float()).to(dtype)
