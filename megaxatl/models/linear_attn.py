"""What the retention and GLA mixers share: the decode cache and the choice of form.

Both are gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t,
with g a constant log gamma_h per head (retention) or a data-dependent per-key-dim forget gate
(GLA). The three forms compute the same function (kernels/src/gla/):
    'chunk'      chunkwise recurrent (kernels' `gla_scan`, dispatched): training, any length
    'parallel'   quadratic masked-decay scores: training, short sequences
    'recurrent'  step by step: the reference; decoding uses its one-step form
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megaxatl.kernels import gla_scan, gla_state_update
from megaxatl.kernels.gla.naive import gla_parallel, gla_recurrent

FORM_FNS = {"chunk": gla_scan, "parallel": gla_parallel, "recurrent": gla_recurrent}


@dataclass
class LinearAttnCache:
    """state: (B, H, K, V) fp32, the whole past in constant memory; pos: tokens seen (rotary offset)."""

    state: torch.Tensor
    pos: int = 0


class LinearAttnMixer(nn.Module):
    """Base of the retention and GLA mixers: set n_heads and head_dim; the cache is one state."""

    n_heads: int
    head_dim: int

    def empty_cache(self, batch: int, device, dtype) -> LinearAttnCache:
        hd = self.head_dim
        return LinearAttnCache(torch.zeros(batch, self.n_heads, hd, hd, device=device, dtype=torch.float32), 0)


def run_form(form: str, q, k, v, g, scale: float, chunk_size: int, cache: LinearAttnCache | None):
    """q, k: (B, L, H, K); v: (B, L, H, V); g: (B, L, H, K or 1) -> o (B, L, H, V), new cache or None."""
    if cache is None:
        return FORM_FNS[form](q, k, v, g, scale, chunk_size), None
    seqlen = q.shape[1]
    if seqlen == 1:
        o, state = gla_state_update(cache.state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], scale)
        return o.unsqueeze(1), LinearAttnCache(state, cache.pos + 1)
    o, state = FORM_FNS[form](q, k, v, g, scale, chunk_size, initial_state=cache.state, return_final_state=True)
    return o, LinearAttnCache(state, cache.pos + seqlen)


def repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, L, KV, d) -> (B, L, KV * n_rep, d): each KV head serves its group of query heads (GQA)."""
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=2)
