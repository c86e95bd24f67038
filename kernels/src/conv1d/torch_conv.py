"""Causal depthwise conv1d with F.conv1d(groups=d) on left-padded input (the `torch`/`cpu` backend)."""

from __future__ import annotations

import torch.nn.functional as F

from .common import check_conv_args, with_history


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False):
    """Same contract as naive.causal_conv1d; any device. Computes in fp32."""
    check_conv_args(x, weight, bias, activation, initial_state)
    d, k = weight.shape
    xp = with_history(x.float(), None if initial_state is None else initial_state.float(), k)
    y = F.conv1d(xp, weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=d)
    if activation is not None:
        y = F.silu(y)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, xp[:, :, xp.shape[-1] - (k - 1):].to(x.dtype)
