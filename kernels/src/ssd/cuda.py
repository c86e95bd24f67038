"""Mamba-2 ops through mamba-ssm's Triton kernels (the `cuda` backend).

# GPU path: the kernels run only on a GPU. mamba_chunk_scan_combined asserts shapes only (and makes
# x, z, B, C contiguous itself where needed); `prepare_ssd_scan` repeats those asserts, so the CPU
# contract tests cover Mamba-2's scan call beside its conv call.
"""

from __future__ import annotations

from .common import check_ssd_args


def prepare_ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
                     initial_states=None, return_final_states=False, device_checks: bool = True):
    """The shape asserts of mamba-ssm's _mamba_chunk_scan_combined_fwd (ours are the same set, with
    the argument named). -> the fp32 A / D / dt_bias it is handed."""
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    return A.float(), None if D is None else D.float(), None if dt_bias is None else dt_bias.float()


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
             initial_states=None, return_final_states=False):
    """Same contract as naive.ssd_scan, on CUDA tensors (note mamba-ssm's dt_softplus default is False)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    A, D, dt_bias = prepare_ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states)
    out = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                    initial_states=initial_states, dt_softplus=dt_softplus,
                                    return_final_states=return_final_states)
    if return_final_states:
        y, final = out
        return y, final.float()
    return out


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """Same contract as naive.ssd_state_update; functional (mamba-ssm updates in place: we clone)."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as ssu

    bsz, H, P = x.shape
    N = state.shape[-1]
    # mamba-ssm's multi-head state update takes per-(head, headdim) tensors: broadcast with stride 0
    A_hp = A.float()[:, None, None].expand(H, P, N)
    dt_hp = dt[..., None].expand(bsz, H, P)
    D_hp = None if D is None else (D.float()[:, None].expand(H, P) if D.dim() == 1 else D.float())
    bias_hp = None if dt_bias is None else dt_bias.float()[:, None].expand(H, P)
    new_state = state.float().clone()
    y = ssu(new_state, x, dt_hp, A_hp, B, C, D=D_hp, z=z, dt_bias=bias_hp, dt_softplus=dt_softplus)
    return y.to(x.dtype), new_state
