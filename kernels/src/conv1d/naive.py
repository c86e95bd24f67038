"""Causal depthwise conv1d: the pure-PyTorch sequential reference (the oracle).

y_t = bias + sum_j weight[:, j] * x_{t - (k-1) + j}, where inputs before t = 0 come from
initial_state (the previous k-1 inputs, oldest first) or are zero; then optional silu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_conv_args, check_update_args, with_history


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False):
    """x: (Bt, d, L); weight: (d, k); bias: (d,); initial_state: (Bt, d, k-1).
    Returns y (Bt, d, L) in x's dtype [, final_state (Bt, d, k-1) = the last k-1 inputs]."""
    check_conv_args(x, weight, bias, activation, initial_state)
    k, L = weight.shape[1], x.shape[-1]
    xp = with_history(x.float(), None if initial_state is None else initial_state.float(), k)
    w = weight.float()
    ys = [(xp[:, :, t:t + k] * w).sum(-1) for t in range(L)]  # one window per output step
    y = torch.stack(ys, dim=-1) if ys else x.float().new_zeros(x.shape)
    if bias is not None:
        y = y + bias.float()[:, None]
    if activation is not None:
        y = F.silu(y)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, xp[:, :, xp.shape[-1] - (k - 1):].to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One decode step. x: (Bt, d); conv_state: (Bt, d, k-1) previous inputs, oldest first.
    Returns (y (Bt, d) in x's dtype, new_conv_state (Bt, d, k-1) in conv_state's dtype).
    Functional: conv_state is not modified."""
    check_update_args(x, conv_state, weight, bias, activation)
    window = torch.cat([conv_state.float(), x.float()[..., None]], dim=-1)  # (Bt, d, k)
    y = (window * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    if activation is not None:
        y = F.silu(y)
    return y.to(x.dtype), window[..., 1:].to(conv_state.dtype)
