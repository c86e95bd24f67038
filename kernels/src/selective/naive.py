"""Mamba-1 selective scan: the pure-PyTorch sequential reference (the oracle).

Written for obviousness, not speed: one Python iteration per time step, fp32 throughout, and
autograd through the loop is the reference gradient every other backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_scan_args


def _expand_groups(t: torch.Tensor, d: int) -> torch.Tensor:
    """B/C (Bt, N, L) or (Bt, G, N, L) -> per channel (Bt, d, N, L) (a broadcast view, no copy);
    channel i uses group i // (d/G)."""
    t = t.float()
    if t.dim() == 3:
        t = t.unsqueeze(1)
    bsz, g, n, L = t.shape
    return t.unsqueeze(2).expand(bsz, g, d // g, n, L).reshape(bsz, d, n, L) if g > 1 else t.expand(bsz, d, n, L)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """u, delta, z: (Bt, d, L); A: (d, N); B, C: (Bt, N, L) or (Bt, G, N, L); D, delta_bias: (d,);
    initial_state: (Bt, d, N). Returns y (Bt, d, L) in u's dtype [, last state (Bt, d, N) fp32]."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    bsz, d, L = u.shape
    uf, dt, A = u.float(), delta.float(), A.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Bx, Cx = _expand_groups(B, d), _expand_groups(C, d)
    h = initial_state.float() if initial_state is not None else u.new_zeros(bsz, d, A.shape[1], dtype=torch.float32)
    ys = []
    # unbind once instead of indexing [..., t] per step: the backward of an index allocates a
    # gradient the size of the whole input at every step (O(L^2) memory traffic)
    for u_t, dt_t, B_t, C_t in zip(uf.unbind(-1), dt.unbind(-1), Bx.unbind(-1), Cx.unbind(-1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * uf
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step. state: (Bt, d, N) fp32; x, dt, z: (Bt, d); A: (d, N); B, C: (Bt, N) or
    (Bt, G, N); D, dt_bias: (d,). Returns (y (Bt, d) in x's dtype, new_state (Bt, d, N) fp32).
    Functional: `state` is not modified."""
    bsz, d = x.shape
    if state.shape != (bsz, d, A.shape[1]):
        raise ValueError(f"selective_state_update: state must be {(bsz, d, A.shape[1])}, got {tuple(state.shape)}")
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bx = B.float() if B.dim() == 3 else B.float().unsqueeze(1)
    Cx = C.float() if C.dim() == 3 else C.float().unsqueeze(1)
    Bx, Cx = Bx.repeat_interleave(d // Bx.shape[1], dim=1), Cx.repeat_interleave(d // Cx.shape[1], dim=1)
    xf = x.float()
    new_state = torch.exp(dtf[..., None] * A.float()) * state.float() + (dtf * xf)[..., None] * Bx
    y = (new_state * Cx).sum(-1)
    if D is not None:
        y = y + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), new_state
