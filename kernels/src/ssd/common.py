"""Shared argument checks and small helpers for the SSD (Mamba-2) ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_ssd_args(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None) -> None:
    """Validate mamba_chunk_scan_combined-style shapes; raise ValueError naming the argument."""
    if x.dim() != 4:
        raise ValueError(f"ssd_scan: x must be (batch, L, heads, headdim), got {tuple(x.shape)}")
    bsz, L, H, P = x.shape
    if dt.shape != (bsz, L, H):
        raise ValueError(f"ssd_scan: dt must be {(bsz, L, H)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"ssd_scan: A must be ({H},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (bsz, L) or C.shape != B.shape:
        raise ValueError(f"ssd_scan: B and C must both be ({bsz}, {L}, groups, n), "
                         f"got {tuple(B.shape)}, {tuple(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if H % G:
        raise ValueError(f"ssd_scan: heads={H} is not a multiple of groups={G}")
    if int(chunk_size) < 1:
        raise ValueError(f"ssd_scan: chunk_size must be >= 1, got {chunk_size}")
    if D is not None and tuple(D.shape) not in ((H,), (H, P)):
        raise ValueError(f"ssd_scan: D must be ({H},) or ({H}, {P}), got {tuple(D.shape)}")
    for name, t, shape in (("z", z, (bsz, L, H, P)), ("dt_bias", dt_bias, (H,)),
                           ("initial_states", initial_states, (bsz, H, P, N))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"ssd_scan: {name} must be {shape}, got {tuple(t.shape)}")


def heads_from_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """B/C (..., G, N) -> (..., H, N): head h reads group h // (H / G) (mamba-ssm's convention)."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def discretize_dt(dt: torch.Tensor, dt_bias, dt_softplus: bool) -> torch.Tensor:
    """dt (Bt, L, H) -> fp32, + bias (H,), softplus if asked."""
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    return F.softplus(dtf) if dt_softplus else dtf


def skip_and_gate(y: torch.Tensor, x: torch.Tensor, D, z) -> torch.Tensor:
    """y + D x, then * silu(z); all fp32. y, x, z: (Bt, L, H, P); D (H,) or (H, P)."""
    if D is not None:
        Df = D.float()
        y = y + (Df[:, None] if Df.dim() == 1 else Df) * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y
