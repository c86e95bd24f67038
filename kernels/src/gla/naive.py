"""Reference gated linear attention (the oracle): the recurrence step by step, the parallel
(quadratic) form, and one decode step. All compute in fp32 and return q's dtype; states are fp32.

Shapes (fla's (B, T, H, K) layout):
    q, k: (Bt, L, H, K); v: (Bt, L, H, V)
    g:    (Bt, L, H, K) log forget gate per key dim (GLA), or (Bt, L, H, 1) one per head
          (retention: log gamma_h); g <= 0
    state: (Bt, H, K, V) fp32

Recurrence (q scaled by `scale`, K**-0.5 when None):
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          o_t = (scale q_t) S_t
so o_t = sum_{s<=t} (scale q_t * exp(G_t - G_s)) . k_s  v_s  +  (scale q_t * exp(G_t)) S_0,
with G the inclusive cumulative sum of g along L.
"""

from __future__ import annotations

import torch


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def gla_recurrent(q, k, v, g, scale=None, chunk_size=None, initial_state=None, return_final_state=False):
    """The sequential recurrence. `chunk_size` is accepted (and ignored) so every backend shares
    one signature. Returns o (Bt, L, H, V) [, final state (Bt, H, K, V) fp32]."""
    bsz, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    s = _scale(q, scale)
    qf, kf, vf, gf = (t.float() for t in (q, k, v, g))
    state = (initial_state.float() if initial_state is not None
             else torch.zeros(bsz, heads, dk, dv, dtype=torch.float32, device=q.device))
    outs = []
    for t in range(seqlen):
        state = state * gf[:, t].exp().unsqueeze(-1) + kf[:, t].unsqueeze(-1) * vf[:, t].unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t] * s, state))
    o = (torch.stack(outs, 1) if outs else vf.new_zeros(bsz, 0, heads, dv)).to(q.dtype)
    return (o, state) if return_final_state else o


def gla_parallel(q, k, v, g, scale=None, chunk_size=None, initial_state=None, return_final_state=False):
    """The parallel form: one (L, L) masked, decayed score matrix per head (RetNet's training form).
    Per-key-dim decay needs an (L, L, K) intermediate: short sequences only."""
    bsz, seqlen, heads, dk = q.shape
    s = _scale(q, scale)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # (Bt, H, L, .)
    G = g.float().transpose(1, 2).cumsum(2)  # (Bt, H, L, K or 1)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
    # exp(G_i - G_j) for j <= i, 0 above the diagonal; masked before exp so nothing overflows
    diff = G.unsqueeze(3) - G.unsqueeze(2)  # (Bt, H, L, L, K or 1)
    decay = torch.where(causal[:, :, None], diff, float("-inf")).exp()
    if G.shape[-1] == 1:
        scores = (qf @ kf.transpose(-1, -2)) * decay.squeeze(-1)
    else:
        scores = torch.einsum("bhik,bhjk,bhijk->bhij", qf, kf, decay)
    o = (scores * s) @ vf
    if initial_state is not None:
        o = o + (qf * s * G.exp()) @ initial_state.float()
    o = o.transpose(1, 2).to(q.dtype)
    if not return_final_state:
        return o
    last = G[:, :, -1:] if seqlen else torch.zeros_like(G[:, :, :1])
    w = kf * (last - G).exp()  # k_s decayed to the end of the sequence
    state = w.transpose(-1, -2) @ vf
    if initial_state is not None:
        state = state + initial_state.float() * last.squeeze(2).exp().unsqueeze(-1)
    return o, state


def gla_state_update(state, q, k, v, g, scale=None):
    """One decode step. state: (Bt, H, K, V) fp32; q, k: (Bt, H, K); v: (Bt, H, V); g: (Bt, H, K or 1).
    Returns (o (Bt, H, V) in q's dtype, new state fp32); the input state is not modified."""
    s = _scale(q, scale)
    new = state.float() * g.float().exp().unsqueeze(-1) + k.float().unsqueeze(-1) * v.float().unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", q.float() * s, new)
    return o.to(q.dtype), new
