"""Argument checks and the shared wrapper every fast selective-scan backend uses.

A fast backend only implements the *core* recurrence, on fp32 contiguous tensors:

    core(u, dt, A, B, C, h0) -> (y, h_last)
        u, dt: (Bt, D, L)   dt already = softplus(delta + delta_bias) when asked
        A: (D, N)           B, C: (Bt, G, N, L)      h0: (Bt, D, N) or None
        y: (Bt, D, L)       h_last: (Bt, D, N)
        h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t ;  y_t = <C_t, h_t>

and `scan_with_core` adds the cheap elementwise parts (bias, softplus, D skip, silu(z) gate, dtype
casts) in plain PyTorch, where autograd differentiates them. Keeping those out of the cores keeps
each core (C++, Triton, chunked PyTorch) small and identical in contract.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Core = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None) -> int:
    """Validate shapes (mamba-ssm conventions); returns the number of B/C groups G."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, d, L), got {tuple(u.shape)}")
    bsz, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta {tuple(delta.shape)} != u {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (d={d}, n), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        ok = (t.dim() == 3 and t.shape == (bsz, n, L)) or (
            t.dim() == 4 and t.shape[0] == bsz and t.shape[2:] == (n, L))
        if not ok:
            raise ValueError(f"selective_scan: {name} must be ({bsz}, {n}, {L}) or ({bsz}, g, {n}, {L}), "
                             f"got {tuple(t.shape)}")
    g = B.shape[1] if B.dim() == 4 else 1
    if C.dim() != B.dim() or (C.dim() == 4 and C.shape[1] != g):
        raise ValueError("selective_scan: B and C must have the same grouping")
    if d % g:
        raise ValueError(f"selective_scan: d={d} is not a multiple of the number of groups {g}")
    for name, t, shape in (("D", D, (d,)), ("delta_bias", delta_bias, (d,)), ("z", z, u.shape),
                           ("initial_state", initial_state, (bsz, d, n))):
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"selective_scan: {name} must be {tuple(shape)}, got {tuple(t.shape)}")
    return g


def discretize_dt(delta: torch.Tensor, delta_bias, delta_softplus: bool) -> torch.Tensor:
    """delta: (..., d, L) -> fp32 dt; bias (d,) broadcast over L."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    return F.softplus(dt) if delta_softplus else dt


def as_groups(t: torch.Tensor) -> torch.Tensor:
    """B or C: (Bt, N, L) -> (Bt, 1, N, L); grouped (Bt, G, N, L) unchanged; fp32."""
    return (t.unsqueeze(1) if t.dim() == 3 else t).float()


def scan_with_core(core: Core, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """The public selective_scan semantics on top of `core` (see the module docstring)."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt = discretize_dt(delta, delta_bias, delta_softplus)
    h0 = None if initial_state is None else initial_state.float()
    y, last = core(u.float(), dt, A.float(), as_groups(B), as_groups(C), h0)
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y
