"""Causal depthwise conv through the causal-conv1d package (the `cuda` backend).

# GPU path: not exercised on CPU CI. Dispatch only routes CUDA tensors here, and only when
# `causal_conv1d` imports. Cases it handles differently fall back to F.conv1d (noted inline).
"""

from __future__ import annotations

from .common import check_conv_args, check_update_args


def _version_at_least(major: int, minor: int) -> bool:
    import causal_conv1d

    parts = getattr(causal_conv1d, "__version__", "0.0").split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False):
    """Same contract as naive.causal_conv1d, on CUDA tensors."""
    check_conv_args(x, weight, bias, activation, initial_state)
    if initial_state is not None or return_final_state:
        # causal-conv1d's initial/final states need a channel-last x; F.conv1d is fine for prefill
        from .torch_conv import causal_conv1d as torch_conv

        return torch_conv(x, weight, bias, activation, initial_state, return_final_state)
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Same contract as naive.causal_conv1d_update (functional: the state is cloned, not modified)."""
    check_update_args(x, conv_state, weight, bias, activation)
    if not _version_at_least(1, 4):  # before 1.4 the state had width k, not k - 1
        from .naive import causal_conv1d_update as reference

        return reference(x, conv_state, weight, bias, activation)
    from causal_conv1d import causal_conv1d_update as ccu

    new_state = conv_state.to(x.dtype).clone()
    y = ccu(x, new_state, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation)
    return y, new_state.to(conv_state.dtype)
