"""Mamba-2 SSD scan in the chunked matmul form (mamba-ssm's `ssd_minimal_discrete`), pure PyTorch.

The `torch` and `cpu` backend. Per chunk of T steps: an intra-chunk quadratic part (attention-like
C B^T masked by the decay matrix, all batched matmuls), the chunk's end state, then a state-passing
step across chunks, then each chunk's output from the state entering it. Autograd differentiates it.
Numerically safe: every exponent is a segment sum of dt*A <= 0 computed directly (the "stable"
segsum: a masked cumsum, not a difference of two large cumsums), so no exp(+large).

Groups stay grouped: heads are viewed as (G, H/G) so B/C are never repeated per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_ssd_args, discretize_dt, skip_and_gate


def segsum(x: torch.Tensor) -> torch.Tensor:
    """x: (..., T) -> (..., T, T) with out[i, j] = x[j+1] + ... + x[i] for j <= i, -inf for j > i."""
    T = x.shape[-1]
    xx = x[..., None].expand(*x.shape, T)  # xx[..., k, j] = x[k]
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~below, 0.0)
    out = torch.cumsum(xx, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_core(x, dt, A, B, C, chunk_size: int, h0=None):
    """x: (Bt, L, H, P); dt: (Bt, L, H) (final, after bias/softplus); A: (H,); B, C: (Bt, L, G, N);
    h0: (Bt, H, P, N) or None; all fp32. Returns y (Bt, L, H, P) without the D skip, final (Bt, H, P, N)."""
    bsz, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    r, T = H // G, int(chunk_size)
    pad = -L % T
    if pad:  # dt = 0 past the end: decay exp(0) = 1 and no input, so the final state is unchanged
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (L + pad) // T
    X = (x * dt[..., None]).reshape(bsz, c, T, G, r, P)
    Bc, Cc = B.reshape(bsz, c, T, G, N), C.reshape(bsz, c, T, G, N)
    Adt = (dt * A).reshape(bsz, c, T, G, r).permute(0, 3, 4, 1, 2)  # (Bt, G, r, c, T)
    A_cs = torch.cumsum(Adt, dim=-1)

    # 1. intra-chunk (diagonal blocks): y_l = sum_{s<=l} C_l.B_s exp(A_cs[l] - A_cs[s]) dt_s x_s
    decay = torch.exp(segsum(Adt)).permute(0, 3, 1, 2, 4, 5)  # (Bt, c, G, r, T(l), T(s))
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    Y_diag = torch.einsum("bcgrls,bcsgrp->bclgrp", CB[:, :, :, None] * decay, X)

    # 2. each chunk's end state, from its own inputs only
    decay_to_end = torch.exp(A_cs[..., -1:] - A_cs).permute(0, 3, 4, 1, 2)[..., None]  # (Bt, c, T, G, r, 1)
    states = torch.einsum("bclgn,bclgrp->bcgrpn", Bc, X * decay_to_end)

    # 3. pass states across chunks (exact, quadratic in the number of chunks, which is small)
    init = (h0.reshape(bsz, 1, G, r, P, N) if h0 is not None
            else states.new_zeros(bsz, 1, G, r, P, N))
    states = torch.cat([init, states], dim=1)  # (Bt, c+1, G, r, P, N)
    chunk_decay = torch.exp(segsum(F.pad(A_cs[..., -1], (1, 0))))  # (Bt, G, r, c+1, c+1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4. contribution of the state entering each chunk
    decay_in = torch.exp(A_cs).permute(0, 3, 4, 1, 2)[..., None]  # (Bt, c, T, G, r, 1)
    Y_off = torch.einsum("bclgn,bcgrpn->bclgrp", Cc, entering) * decay_in

    y = (Y_diag + Y_off).reshape(bsz, c * T, H, P)[:, :L]
    return y, final.reshape(bsz, H, P, N)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
             initial_states=None, return_final_states=False):
    """Same contract as naive.ssd_scan; any device."""
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    dtf = discretize_dt(dt, dt_bias, dt_softplus)
    h0 = None if initial_states is None else initial_states.float()
    y, final = ssd_core(x.float(), dtf, A.float(), B.float(), C.float(), chunk_size, h0)
    y = skip_and_gate(y, x, D, z).to(x.dtype)
    return (y, final) if return_final_states else y
