"""Mamba-2 SSD scan through the Triton selective-scan kernels (the `triton` backend).

SSD is the Mamba-1 recurrence with a decay that is one scalar per head: flatten (head, headdim)
into H*P channels, broadcast dt and A over headdim (and A over the state dim), and the groups line
up (channel h*P + p belongs to group h // (H/G)). This runs the recurrent form (sequential over
time, O(L) work, no chunking), forward and backward, with the same kernels as
selective/triton_scan.py; autograd sums the broadcast dt/A gradients back per head.
On a GPU, mamba-ssm's chunked tensor-core kernels (the `cuda` backend) are preferred when installed.
"""

from __future__ import annotations

from ..selective.triton_scan import scan_core
from .common import check_ssd_args, discretize_dt, skip_and_gate


def ssd_as_selective_scan(core, x, dt, A, B, C, h0=None):
    """x: (Bt, L, H, P); dt: (Bt, L, H) final; A: (H,); B, C: (Bt, L, G, N); h0: (Bt, H, P, N) | None.
    Runs a selective-scan `core` (common.py contract); returns y (Bt, L, H, P), final (Bt, H, P, N)."""
    bsz, L, H, P = x.shape
    N = B.shape[-1]
    u = x.reshape(bsz, L, H * P).transpose(1, 2)
    dt_ch = dt[..., None].expand(bsz, L, H, P).reshape(bsz, L, H * P).transpose(1, 2)
    A_ch = A[:, None, None].expand(H, P, N).reshape(H * P, N)
    h0_ch = None if h0 is None else h0.reshape(bsz, H * P, N)
    y, last = core(u, dt_ch, A_ch, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), h0_ch)
    return y.transpose(1, 2).reshape(bsz, L, H, P), last.reshape(bsz, H, P, N)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
             initial_states=None, return_final_states=False):
    """Same contract as naive.ssd_scan (chunk_size only validated: the recurrent form has no chunks)."""
    check_ssd_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states)
    dtf = discretize_dt(dt, dt_bias, dt_softplus)
    h0 = None if initial_states is None else initial_states.float()
    y, final = ssd_as_selective_scan(scan_core, x.float(), dtf, A.float(), B.float(), C.float(), h0)
    y = skip_and_gate(y, x, D, z).to(x.dtype)
    return (y, final) if return_final_states else y
