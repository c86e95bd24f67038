"""Argument checks shared by the causal depthwise conv backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")  # swish == silu (causal-conv1d accepts both names)


def check_conv_args(x, weight, bias=None, activation=None, initial_state=None) -> None:
    """x: (Bt, d, L); weight: (d, k); bias: (d,); initial_state: (Bt, d, k-1)."""
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, d, L), got {tuple(x.shape)}")
    bsz, d, _ = x.shape
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"causal_conv1d: weight must be (d={d}, k), got {tuple(weight.shape)}")
    k = weight.shape[1]
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"causal_conv1d: bias must be ({d},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    if initial_state is not None and tuple(initial_state.shape) != (bsz, d, k - 1):
        raise ValueError(f"causal_conv1d: initial_state must be {(bsz, d, k - 1)}, got {tuple(initial_state.shape)}")


def check_update_args(x, conv_state, weight, bias=None, activation=None) -> None:
    """x: (Bt, d); conv_state: (Bt, d, k-1); weight: (d, k); bias: (d,)."""
    if x.dim() != 2:
        raise ValueError(f"causal_conv1d_update: x must be (batch, d), got {tuple(x.shape)}")
    bsz, d = x.shape
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"causal_conv1d_update: weight must be (d={d}, k), got {tuple(weight.shape)}")
    if tuple(conv_state.shape) != (bsz, d, weight.shape[1] - 1):
        raise ValueError(f"causal_conv1d_update: conv_state must be {(bsz, d, weight.shape[1] - 1)}, "
                         f"got {tuple(conv_state.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"causal_conv1d_update: bias must be ({d},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d_update: activation must be None or 'silu', got {activation!r}")


def with_history(x, initial_state, k: int):
    """(Bt, d, L) -> (Bt, d, k-1+L): the k-1 previous inputs (initial_state, or zeros) then x."""
    if initial_state is None:
        return F.pad(x, (k - 1, 0))
    return torch.cat([initial_state.to(x.dtype), x], dim=-1)
