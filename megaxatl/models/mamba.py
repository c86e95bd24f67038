"""Mamba-1 selective SSM mixer (mamba-ssm's `Mamba`, with its initialisation).

Parameter names and shapes match mamba-ssm / transformers' MambaMixer so export needs no renaming:
in_proj (2*d_inner, D) packed [x; z] (the global layout never depends on TP: the TP rule shards x
and z separately), conv1d (d_inner, 1, k), x_proj (dt_rank + 2N, d_inner), dt_proj
(d_inner, dt_rank) + bias, A_log (d_inner, N), D (d_inner), out_proj (D, d_inner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megaxatl.kernels import causal_conv1d_update, mamba_inner, selective_state_update
from megaxatl.kernels.selective.inner import compose
from megaxatl.models.params import fp32, mark_fp32


@dataclass
class MambaCache:
    conv: torch.Tensor  # (B, d_inner, k - 1): the last k - 1 conv inputs
    ssm: torch.Tensor  # (B, d_inner, N), fp32


def init_dt_bias(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Bias such that softplus(bias) is log-uniform in [dt_min, dt_max] (mamba-ssm)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2.0,
                 dt_rank: int | None = None, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, proj_bias: bool = False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=proj_bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        mark_fp32(self.dt_proj.bias)  # the dt bias: fp32 like A_log and D (softplus of it is dt)
        self.A_log = mark_fp32(nn.Parameter(torch.empty(self.d_inner, d_state)))
        self.D = mark_fp32(nn.Parameter(torch.empty(self.d_inner)))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The SSM-specific init (the LM's generic init covers in/x/out projections)."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, self.dt_min, self.dt_max, self.dt_init_floor))
        # S4D-real: A = -(1..N) for every channel
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)
        self.conv1d.reset_parameters()

    def empty_cache(self, batch: int, device, dtype) -> MambaCache:
        return MambaCache(torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32))

    def _ssm_inputs(self, x: torch.Tensor):
        """x: (..., d_inner) -> dt (..., d_inner) without bias, B, C (..., N)."""
        dbc = self.x_proj(x)
        dt, B, C = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    # Without a cache (training, scoring) everything after in_proj is one op, `mamba_inner`: on the
    # cuda backend mamba-ssm's fused mamba_inner_fn (its scan keeps no per-step states and the conv
    # is recomputed in backward), elsewhere the same composition of the dispatched conv and scan as
    # below. Tensor parallelism turns it off (parallel/tensor_parallel.py): x_proj and out_proj
    # then all-reduce, which a fused call cannot do between its steps.
    fused_inner = True

    def forward(self, hidden: torch.Tensor, cache: MambaCache | None = None):
        """hidden: (B, L, D) -> (B, L, D); with `cache`, continues the cached sequence."""
        if cache is not None and hidden.shape[1] == 1:
            return self._step(hidden, cache)
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2 d_inner, L): [x; z]
        conv_w = self.conv1d.weight.squeeze(1)
        A, D, dt_bias = -torch.exp(fp32(self.A_log)), fp32(self.D), fp32(self.dt_proj.bias)
        if cache is None and self.fused_inner:
            out = mamba_inner(xz, conv_w, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                              self.out_proj.weight, self.out_proj.bias, A, D, dt_bias)
            return out, None
        if cache is None:
            y = compose(xz, conv_w, self.conv1d.bias, self.x_proj, self.dt_proj.weight, A, D, dt_bias)
        else:
            y, (conv_state, ssm_state) = compose(xz, conv_w, self.conv1d.bias, self.x_proj, self.dt_proj.weight,
                                                 A, D, dt_bias, conv_state=cache.conv, ssm_state=cache.ssm)
            cache = MambaCache(conv_state, ssm_state)
        return self.out_proj(y.transpose(1, 2)), cache

    def _step(self, hidden: torch.Tensor, cache: MambaCache):
        """One token: hidden (B, 1, D). O(1) in the sequence length."""
        x, z = self.in_proj(hidden[:, 0]).chunk(2, dim=-1)  # (B, d_inner)
        x, conv_state = causal_conv1d_update(x, cache.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        dt, B, C = self._ssm_inputs(x)
        y, ssm_state = selective_state_update(cache.ssm, x, dt, -torch.exp(fp32(self.A_log)), B, C,
                                              D=fp32(self.D), z=z, dt_bias=fp32(self.dt_proj.bias),
                                              dt_softplus=True)
        return self.out_proj(y).unsqueeze(1), MambaCache(conv_state, ssm_state)
