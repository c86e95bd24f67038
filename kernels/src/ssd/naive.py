"""Mamba-2 SSD scan: the pure-PyTorch sequential reference (the oracle).

Semantics of mamba-ssm's `mamba_chunk_scan_combined` (chunking is an implementation detail there,
so the reference ignores chunk_size). One Python iteration per time step, fp32; autograd through
the loop is the reference gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_ssd_args, heads_from_groups


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
             initial_states=None, return_final_states=False):
    """x, z: (Bt, L, H, P); dt: (Bt, L, H); A: (H,); B, C: (Bt, L, G, N); D: (H,) or (H, P);
    dt_bias: (H,); initial_states: (Bt, H, P, N). Returns y (Bt, L, H, P) in x's dtype
    [, final states (Bt, H, P, N) fp32]."""
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    bsz, L, H, P = x.shape
    xf, dtf = x.float(), dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bh, Ch = heads_from_groups(B.float(), H), heads_from_groups(C.float(), H)  # (Bt, L, H, N)
    h = (initial_states.float() if initial_states is not None
         else x.new_zeros(bsz, H, P, B.shape[-1], dtype=torch.float32))
    ys = []
    # unbind once: indexing [:, t] per step would make autograd allocate whole-input grads per step
    for x_t, dt_t, B_t, C_t in zip(xf.unbind(1), dtf.unbind(1), Bh.unbind(1), Ch.unbind(1)):
        decay = torch.exp(dt_t * A.float())  # (Bt, H): one scalar per head
        h = decay[:, :, None, None] * h + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append((h * C_t[:, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        Df = D.float()
        y = y + (Df[:, None] if Df.dim() == 1 else Df) * xf
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, h) if return_final_states else y


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """One decode step. state: (Bt, H, P, N) fp32; x, z: (Bt, H, P); dt: (Bt, H); A: (H,);
    B, C: (Bt, G, N); D: (H,) or (H, P); dt_bias: (H,). Returns (y (Bt, H, P) in x's dtype,
    new_state (Bt, H, P, N) fp32). Functional: `state` is not modified."""
    bsz, H, P = x.shape
    if state.shape[:3] != (bsz, H, P) or state.shape[3] != B.shape[-1]:
        raise ValueError(f"ssd_state_update: state must be {(bsz, H, P, B.shape[-1])}, got {tuple(state.shape)}")
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bh, Ch = heads_from_groups(B.float(), H), heads_from_groups(C.float(), H)  # (Bt, H, N)
    xf = x.float()
    decay = torch.exp(dtf * A.float())
    new_state = decay[:, :, None, None] * state.float() + (dtf[:, :, None] * xf)[..., None] * Bh[:, :, None, :]
    y = (new_state * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        Df = D.float()
        y = y + (Df[:, None] if Df.dim() == 1 else Df) * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), new_state
