"""Mamba-1 ops through mamba-ssm's CUDA / Triton kernels (the `cuda` backend).

# GPU path: the kernels run only on a GPU; on CPU the tests run `prepare_selective_scan` (the
# layouts and dtypes selective_scan_cuda.fwd checks) for every Mamba-1 mixer, config and TP size.
Features mamba-ssm lacks fall through to our own kernels (dispatch.fallback, counted in used()).
"""

from __future__ import annotations

import torch

from .. import dispatch
from ..contract import FLOATS, on_cuda, require, shape
from .common import check_scan_args

LIB = "mamba-ssm selective_scan_cuda"


def check_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, device_checks: bool = True) -> None:
    """selective_scan_fwd's TORCH_CHECKs (mamba-ssm 2.2-2.3, csrc/selective_scan/selective_scan.cpp)
    for real A and variable (per-token) B, C, as the kernel receives them."""
    require(u.dtype in FLOATS, LIB, f"u dtype must be float32, float16 or bfloat16, got {u.dtype}")
    require(A.dtype == torch.float32, LIB, f"A must be float32, got {A.dtype}")
    for name, t in (("delta", delta), ("B", B), ("C", C)):
        require(t.dtype == u.dtype, LIB, f"{name} dtype {t.dtype} must equal u dtype {u.dtype}")
    on_cuda(LIB, device_checks, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C)):
        require(t.stride(-1) == 1 or t.size(-1) == 1, LIB, f"{name} must be contiguous in its last dim")
    bsz, dim, seqlen = u.shape
    dstate = A.shape[1]
    require(dstate <= 256, LIB, "selective_scan only supports state dimension <= 256")
    shape(delta, (bsz, dim, seqlen), LIB, "delta")
    shape(A, (dim, dstate), LIB, "A")
    groups = B.shape[1]
    shape(B, (bsz, groups, dstate, seqlen), LIB, "B")
    shape(C, (bsz, groups, dstate, seqlen), LIB, "C")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            require(t.dtype == torch.float32, LIB, f"{name} must be float32, got {t.dtype}")
            require(t.stride(-1) == 1 or t.size(-1) == 1, LIB, f"{name} must be contiguous")
            shape(t, (dim,), LIB, name)
    if z is not None:
        require(z.dtype == u.dtype, LIB, f"z dtype {z.dtype} must equal u dtype {u.dtype}")
        require(z.stride(-1) == 1 or z.size(-1) == 1, LIB, "z must be contiguous in its last dim")
        shape(z, (bsz, dim, seqlen), LIB, "z")


def _contig_last(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def prepare_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           initial_state=None, return_last_state=False, device_checks: bool = True):
    """-> the arguments handed to selective_scan_fn (ours: fp32 A / D / bias, delta / B / C / z in
    u's dtype), checked as its kernel checks them after the interface's own contiguous() calls;
    None when this call runs our Triton kernel instead (an initial state)."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if initial_state is not None:
        return None
    dt = u.dtype
    delta, z = delta.to(dt), None if z is None else z.to(dt)
    B, C = B.to(dt), C.to(dt)
    A = A.float()
    D = None if D is None else D.float()
    delta_bias = None if delta_bias is None else delta_bias.float()
    grouped = [t if t.dim() == 4 else t.unsqueeze(1) for t in (_contig_last(B), _contig_last(C))]
    check_fwd(_contig_last(u), _contig_last(delta), A, *grouped, None if D is None else D.contiguous(),
              _contig_last(z), delta_bias, device_checks)
    return u, delta, A, B, C, D, z, delta_bias, delta_softplus


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Same contract as naive.selective_scan, on CUDA tensors."""
    args = prepare_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    if args is None:
        # mamba-ssm's selective_scan_fn starts from a zero state; chunked prefill uses our kernel
        return dispatch.fallback("selective_scan", "triton")(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                             initial_state, return_last_state)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    out = selective_scan_fn(*args, return_last_state)
    if return_last_state:
        y, last = out
        return y, last.float()
    return out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Same contract as naive.selective_state_update (functional: the input state is not modified)."""
    if B.dim() == 3:  # mamba-ssm groups B/C only with a heads dim in the state; use the reference
        return dispatch.fallback("selective_state_update", "naive")(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as ssu

    new_state = state.float().clone()  # mamba-ssm updates the state in place
    y = ssu(new_state, x, dt, A.float(), B, C, D=None if D is None else D.float(), z=z,
            dt_bias=None if dt_bias is None else dt_bias.float(), dt_softplus=dt_softplus)
    return y.to(x.dtype), new_state
