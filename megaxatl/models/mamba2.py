"""Mamba-2 (SSD) mixer, mamba-ssm's `Mamba2` layout (as transformers' Mamba2Mixer names it).

in_proj (2*d_inner + 2*G*N + H, D) packed [z, x, B, C, dt] in that global order (the TP rule
shards each piece separately, so the layout never depends on TP size); conv1d over xBC
(d_inner + 2GN, 1, k); dt_bias, A_log, D: (H,); norm: gated group-wise RMSNorm (d_inner);
out_proj (D, d_inner). Heads are h = d_inner / head_dim, G groups share B and C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from megaxatl.kernels import causal_conv1d, causal_conv1d_update, ssd_scan, ssd_state_update
from megaxatl.models.mamba import init_dt_bias
from megaxatl.models.norms import GatedRMSNorm
from megaxatl.models.params import fp32, mark_fp32


@dataclass
class Mamba2Cache:
    conv: torch.Tensor  # (B, d_inner + 2GN, k - 1)
    ssm: torch.Tensor  # (B, H, P, N), fp32


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: float = 2.0,
                 head_dim: int = 64, n_groups: int = 1, chunk_size: int = 64, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 proj_bias: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        self.d_inner = int(expand * d_model)
        self.d_state, self.d_conv, self.head_dim, self.n_groups = d_state, d_conv, head_dim, n_groups
        self.n_heads = self.d_inner // head_dim
        self.chunk_size = chunk_size
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.conv_dim = self.d_inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = mark_fp32(nn.Parameter(torch.empty(self.n_heads)))
        self.A_log = mark_fp32(nn.Parameter(torch.empty(self.n_heads)))
        self.D = mark_fp32(nn.Parameter(torch.empty(self.n_heads)))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // n_groups, eps=norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        self.dt_bias.copy_(init_dt_bias(self.n_heads, self.dt_min, self.dt_max, self.dt_init_floor))
        # mamba-ssm's A_init_range (1, 16): one decay rate per head
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)
        self.conv1d.reset_parameters()

    def empty_cache(self, batch: int, device, dtype) -> Mamba2Cache:
        return Mamba2Cache(
            torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, device=device, dtype=torch.float32))

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor):
        gn = self.n_groups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        lead = x.shape[:-1]
        return (x.reshape(*lead, self.n_heads, self.head_dim),
                B.reshape(*lead, self.n_groups, self.d_state), C.reshape(*lead, self.n_groups, self.d_state))

    def forward(self, hidden: torch.Tensor, cache: Mamba2Cache | None = None):
        """hidden: (B, L, D) -> (B, L, D); with `cache`, continues the cached sequence."""
        if cache is not None and hidden.shape[1] == 1:
            return self._step(hidden, cache)
        bsz, seqlen, _ = hidden.shape
        z, xbc, dt = self._split(self.in_proj(hidden))
        conv_w = self.conv1d.weight.squeeze(1)
        if cache is None:
            xbc = causal_conv1d(xbc.transpose(1, 2), conv_w, self.conv1d.bias, activation="silu")
        else:
            xbc, conv_state = causal_conv1d(xbc.transpose(1, 2), conv_w, self.conv1d.bias, activation="silu",
                                            initial_state=cache.conv, return_final_state=True)
        x, B, C = self._split_xbc(xbc.transpose(1, 2))
        A = -torch.exp(fp32(self.A_log))
        args = dict(D=fp32(self.D), dt_bias=fp32(self.dt_bias), dt_softplus=True)
        if cache is None:
            y = ssd_scan(x, dt, A, B, C, self.chunk_size, **args)
        else:
            y, ssm_state = ssd_scan(x, dt, A, B, C, self.chunk_size, initial_states=cache.ssm,
                                    return_final_states=True, **args)
            cache = Mamba2Cache(conv_state, ssm_state)
        y = self.norm(y.reshape(bsz, seqlen, self.d_inner), z)
        return self.out_proj(y), cache

    def _step(self, hidden: torch.Tensor, cache: Mamba2Cache):
        z, xbc, dt = self._split(self.in_proj(hidden[:, 0]))
        xbc, conv_state = causal_conv1d_update(xbc, cache.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        x, B, C = self._split_xbc(xbc)
        y, ssm_state = ssd_state_update(cache.ssm, x, dt, -torch.exp(fp32(self.A_log)), B, C,
                                        D=fp32(self.D), dt_bias=fp32(self.dt_bias), dt_softplus=True)
        y = self.norm(y.reshape(y.shape[0], self.d_inner), z)
        return self.out_proj(y).unsqueeze(1), Mamba2Cache(conv_state, ssm_state)
