"""Mamba-1 ops through mamba-ssm's CUDA / Triton kernels (the `cuda` backend).

# GPU path: not exercised on CPU CI. Dispatch only routes CUDA tensors here, and only when
# `mamba_ssm` imports. Features mamba-ssm lacks fall through to our own kernels (noted inline).
"""

from __future__ import annotations


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Same contract as naive.selective_scan, on CUDA tensors."""
    if initial_state is not None:
        # mamba-ssm's selective_scan_fn starts from a zero state; chunked prefill uses our kernel
        from .triton_scan import selective_scan as triton_selective_scan

        return triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                     return_last_state)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    out = selective_scan_fn(u, delta, A.float(), B, C, None if D is None else D.float(), z,
                            None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state)
    if return_last_state:
        y, last = out
        return y, last.float()
    return out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Same contract as naive.selective_state_update (functional: the input state is not modified)."""
    if B.dim() == 3:  # mamba-ssm groups B/C only with a heads dim in the state; use the reference
        from .naive import selective_state_update as reference

        return reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as ssu

    new_state = state.float().clone()  # mamba-ssm updates the state in place
    y = ssu(new_state, x, dt, A.float(), B, C, D=None if D is None else D.float(), z=z,
            dt_bias=None if dt_bias is None else dt_bias.float(), dt_softplus=dt_softplus)
    return y.to(x.dtype), new_state
