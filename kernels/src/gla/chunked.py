"""Chunkwise gated linear attention in pure PyTorch (the `torch` / `cpu` backend), autograd backward.

Per chunk of C steps, with Gc the cumulative log decay inside the chunk (inclusive) and S the
state entering the chunk:
    o_i   = (q_i * exp(Gc_i)) S                                   inter-chunk (one matmul)
          + sum_{j<=i} (q_i * exp(Gc_i - Gc_j)) . k_j  v_j        intra-chunk
    S'    = diag(exp(Gc_C)) S + sum_j (k_j * exp(Gc_C - Gc_j))^T v_j
The intra-chunk decay is taken as differences, masked before exp, so nothing overflows however
strong the decay (no exp(-G) factorisation): for a per-head decay it is a (C, C) matrix, for a
per-key-dim decay a (C, C, K) tensor (hence GLA's smaller default chunk). Chunk-local terms are
computed for all chunks at once; only the (K, V) state recurrence runs over chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gla_chunk(q, k, v, g, scale=None, chunk_size=64, initial_state=None, return_final_state=False):
    """Same contract as naive.gla_recurrent."""
    bsz, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    s = dk ** -0.5 if scale is None else scale
    C = max(1, min(int(chunk_size), max(seqlen, 1)))
    n = -(-seqlen // C)
    pad = n * C - seqlen
    # padding at the end: k = v = 0 adds nothing, g = 0 decays nothing, so the state is exact
    qf, kf, vf, gf = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (q, k, v, g))
    split = lambda t: t.reshape(bsz, heads, n, C, t.shape[-1])  # noqa: E731
    qc, kc, vc = split(qf * s), split(kf), split(vf)
    Gc = split(gf).cumsum(3)  # (Bt, H, n, C, K or 1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = torch.where(causal[:, :, None], Gc.unsqueeze(4) - Gc.unsqueeze(3), float("-inf")).exp()
    if Gc.shape[-1] == 1:
        scores = (qc @ kc.transpose(-1, -2)) * diff.squeeze(-1)
    else:
        scores = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, diff)
    o = scores @ vc  # (Bt, H, n, C, V)
    last = Gc[:, :, :, -1:]  # (Bt, H, n, 1, K or 1)
    local = (kc * (last - Gc).exp()).transpose(-1, -2) @ vc  # (Bt, H, n, K, V): each chunk alone
    chunk_decay = last.squeeze(3).exp().unsqueeze(-1)  # (Bt, H, n, K or 1, 1)
    state = (initial_state.float() if initial_state is not None
             else q.new_zeros(bsz, heads, dk, dv, dtype=torch.float32))
    entering = []
    for c in range(n):
        entering.append(state)
        state = state * chunk_decay[:, :, c] + local[:, :, c]
    if n:
        S = torch.stack(entering, 2)  # (Bt, H, n, K, V)
        o = o + (qc * Gc.exp()) @ S
    o = o.reshape(bsz, heads, n * C, dv)[:, :, :seqlen].transpose(1, 2).to(q.dtype)
    return (o, state) if return_final_state else o
