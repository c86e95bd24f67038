"""A Mamba-1 mixer's inner path in one op: conv -> x_proj -> dt_proj -> selective scan -> out_proj.

    xz: (Bt, 2d, L) the in_proj output [x; z] (channel-first view)   conv_weight (d, k), conv_bias (d,)
    x_proj_weight (R + 2N, d)   dt_proj_weight (d, R)   out_proj_weight (Dm, d), out_proj_bias (Dm,)
    A (d, N) < 0, D (d,), delta_bias (d,): fp32               -> (Bt, L, Dm)

`torch` (every device): `compose`, the mixer's own path through the dispatched causal_conv1d and
selective_scan ops, with the out projection. `cuda`: mamba-ssm's `mamba_inner_fn`, which fuses the
same steps (its selective scan saves no per-step states and recomputes the conv in backward),
used for training at TP 1, where nothing between x_proj and out_proj needs a collective.

# GPU path: mamba_inner_fn runs only on a GPU (its parity with `compose` is checked by
# benchmarks/gpu_check.py); `prepare_mamba_inner` reproduces its layout and dtype requirements and
# runs in the CPU contract tests.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..conv1d import cuda as conv_cuda
from ..contract import on_cuda, require
from ..ops import causal_conv1d, selective_scan
from . import cuda as scan_cuda


def compose(xz, conv_weight, conv_bias, x_proj: Callable, dt_proj_weight, A, D, delta_bias,
            conv_state=None, ssm_state=None):
    """The inner path up to (not including) out_proj. x_proj: the x projection as a callable (the
    tensor-parallel one all-reduces inside). With states (a cached prefill): continues from them.
    -> y (Bt, d, L) [, (conv_state, ssm_state) when states were given]."""
    x, z = xz.chunk(2, dim=1)  # (Bt, d, L) each
    dt_rank, n = dt_proj_weight.shape[1], A.shape[1]
    cached = conv_state is not None
    if cached:
        x, conv_state = causal_conv1d(x, conv_weight, conv_bias, activation="silu", initial_state=conv_state,
                                      return_final_state=True)
    else:
        x = causal_conv1d(x, conv_weight, conv_bias, activation="silu")
    dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [dt_rank, n, n], dim=-1)
    dt = F.linear(dt, dt_proj_weight)
    args = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=True)
    if not cached:
        return selective_scan(x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), **args)
    y, ssm_state = selective_scan(x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                                  initial_state=ssm_state, return_last_state=True, **args)
    return y, (conv_state, ssm_state)


def mamba_inner(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, out_proj_bias,
                A, D, delta_bias):
    """The `torch` backend: `compose` with plain projections."""
    y = compose(xz, conv_weight, conv_bias, lambda t: F.linear(t, x_proj_weight), dt_proj_weight, A, D, delta_bias)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


LIB = "mamba-ssm mamba_inner_fn"


def prepare_mamba_inner(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, out_proj_bias,
                        A, D, delta_bias, device_checks: bool = True):
    """-> the arguments handed to mamba_inner_fn, checked as its two kernels will check them:
    the conv on x = xz.contiguous()[:, :d] (MambaInnerFn makes xz contiguous), the scan on the
    conv output, delta = dt_proj_weight @ x_dbl and B / C from x_dbl, all in xz's dtype."""
    dt = xz.dtype
    conv_weight, conv_bias = conv_weight.to(dt), None if conv_bias is None else conv_bias.to(dt)
    x_proj_weight, dt_proj_weight, out_proj_weight = (w.to(dt) for w in (x_proj_weight, dt_proj_weight,
                                                                         out_proj_weight))
    out_proj_bias = None if out_proj_bias is None else out_proj_bias.to(dt)
    A, D = A.float(), None if D is None else D.float()
    delta_bias = None if delta_bias is None else delta_bias.float()
    bsz, two_d, seqlen = xz.shape
    d, n, r = two_d // 2, A.shape[1], dt_proj_weight.shape[1]
    require(tuple(x_proj_weight.shape) == (r + 2 * n, d), LIB,
            f"x_proj_weight must be ({r + 2 * n}, {d}), got {tuple(x_proj_weight.shape)}")
    require(tuple(dt_proj_weight.shape) == (d, r), LIB, f"dt_proj_weight must be ({d}, {r})")
    x = xz.contiguous()[:, :d]
    conv_cuda.check_fwd(x, conv_weight, conv_bias, device_checks)
    # the scan's inputs as MambaInnerFn builds them on xz's device: contiguous, in the conv output's
    # dtype (meta tensors: only shapes, strides and dtypes are checked, nothing is allocated)
    like = lambda *s: torch.empty(s, dtype=dt, device="meta")  # noqa: E731
    on_cuda(LIB, device_checks, xz=xz, A=A, D=D, delta_bias=delta_bias)
    scan_cuda.check_fwd(like(bsz, d, seqlen), like(bsz, d, seqlen), A.to("meta"), like(bsz, 1, n, seqlen),
                        like(bsz, 1, n, seqlen), None if D is None else D.to("meta"), like(bsz, d, seqlen),
                        None if delta_bias is None else delta_bias.to("meta"), device_checks=False)
    return (xz, conv_weight.unsqueeze(1), conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, out_proj_bias,
            A, D, delta_bias)


def mamba_inner_cuda(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, out_proj_bias,
                     A, D, delta_bias):
    """The `cuda` backend: mamba-ssm's fused mamba_inner_fn (checkpoint_lvl 1: recomputes the conv
    output and delta in backward rather than saving them)."""
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

    (xz, cw, cb, xw, dw, ow, ob, A, D, db) = prepare_mamba_inner(xz, conv_weight, conv_bias, x_proj_weight,
                                                                 dt_proj_weight, out_proj_weight, out_proj_bias,
                                                                 A, D, delta_bias)
    return mamba_inner_fn(xz, cw, cb, xw, dw, ow, ob, A, None, None, D, db, delta_softplus=True)
