"""Chunkwise gated linear attention forward in Triton (the `triton` backend); backward by recompute.

One program per (batch, head) walks the sequence in chunks of BT = 16 steps holding the (K, V)
state in registers. Per chunk, with G the in-chunk cumulative log decay (tl.cumsum):
    o     = (q * exp(G)) @ S                                   one tl.dot (inter-chunk)
          + sum_j [sum_k q[:, k] k_j[k] exp(G[:, k] - G_j[k])]_{i >= j} v_j     (intra-chunk)
    S     = S * exp(G_last)[:, None] + (k * exp(G_last - G))^T @ v
The intra-chunk term loops over the chunk's columns j and takes decays as differences masked to
i >= j before exp, so it never overflows (no exp(-G) factorisation; fla splits chunks into
sub-chunks for the same reason). A per-head decay (retention, g of width 1) is broadcast over K.
Backward: an autograd.Function that recomputes the chunked PyTorch form (chunked.py) and
differentiates it (no Triton backward kernel yet). chunk_size is accepted for the shared signature;
the kernel's chunk is BT. Under TRITON_INTERPRET=1 it runs on CPU tensors (tests); it has not been
compiled for or run on a GPU in this task.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked import gla_chunk as _torch_gla_chunk

BT = 16


@triton.jit
def _gla_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, L, H: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr, HAS_H0: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    rt = tl.arange(0, BT)
    mk = rk < K
    mv = rv < V
    # (B, L, H, K) contiguous: row t of head h starts at ((b * L + t) * H + h) * K
    state_off = (b * H + h) * K * V + rk[:, None] * V + rv[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + state_off, mask=mk[:, None] & mv[None, :], other=0.0)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    for t0 in range(0, L, BT):
        t = t0 + rt
        mt = t < L
        row = (b * L + t) * H + h
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        q = tl.load(q_ptr + row[:, None] * K + rk[None, :], mask=mtk, other=0.0)
        k = tl.load(k_ptr + row[:, None] * K + rk[None, :], mask=mtk, other=0.0)
        v = tl.load(v_ptr + row[:, None] * V + rv[None, :], mask=mtv, other=0.0)
        g = tl.load(g_ptr + row[:, None] * K + rk[None, :], mask=mtk, other=0.0)
        G = tl.cumsum(g, axis=0)
        o = tl.dot(q * tl.exp(G), S, input_precision="ieee")
        for j in range(BT):
            sel = (rt == j)[:, None]
            kj = tl.sum(tl.where(sel, k, 0.0), axis=0)
            Gj = tl.sum(tl.where(sel, G, 0.0), axis=0)
            vj = tl.sum(tl.where(sel, v, 0.0), axis=0)
            causal = (rt >= j)[:, None] & mk[None, :]
            dec = tl.exp(tl.where(causal, G - Gj[None, :], float("-inf")))
            a = tl.sum(q * kj[None, :] * dec, axis=1)
            o += a[:, None] * vj[None, :]
        tl.store(o_ptr + row[:, None] * V + rv[None, :], o, mask=mtv)
        G_last = tl.sum(tl.where((rt == BT - 1)[:, None], G, 0.0), axis=0)
        kd = k * tl.exp(G_last[None, :] - G)
        S = S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(kd), v, input_precision="ieee")
    tl.store(ht_ptr + state_off, S, mask=mk[:, None] & mv[None, :])


def _forward(q, k, v, g, scale, h0):
    bsz, L, H, K = q.shape
    V = v.shape[-1]
    qf = (q.float() * scale).contiguous()
    kf, vf = k.float().contiguous(), v.float().contiguous()
    gf = g.float().expand(bsz, L, H, K).contiguous()
    o = torch.empty(bsz, L, H, V, dtype=torch.float32, device=q.device)
    ht = torch.empty(bsz, H, K, V, dtype=torch.float32, device=q.device)
    h0c = h0.float().contiguous() if h0 is not None else ht  # unused when HAS_H0 is False
    BK, BV = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    _gla_fwd_kernel[(bsz * H,)](qf, kf, vf, gf, h0c, o, ht, L, H, K, V, h0 is not None, BT, BK, BV)
    return o, ht


class _GLAChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale):
        o, ht = _forward(q, k, v, g, scale, h0)
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (q, k, v, g, h0)]
        with torch.enable_grad():
            o, ht = _torch_gla_chunk(*inputs[:4], ctx.scale, BT, inputs[4], True)
            need = [t for t in inputs if t is not None and t.requires_grad]
            outs = [(x, dx) for x, dx in ((o, do), (ht, dht)) if x.requires_grad and dx is not None]
            grads = (torch.autograd.grad([x for x, _ in outs], need, [dx for _, dx in outs], allow_unused=True)
                     if need and outs else [None] * len(need))
        it = iter(grads)
        out = [next(it) if t is not None and t.requires_grad else None for t in inputs]
        return (*out, None)


def gla_chunk_triton(q, k, v, g, scale=None, chunk_size=64, initial_state=None, return_final_state=False):
    """Same contract as naive.gla_recurrent."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    o, ht = _GLAChunk.apply(q, k, v, g, initial_state, s)
    o = o.to(q.dtype)
    return (o, ht) if return_final_state else o


gla_chunk = gla_chunk_triton  # noqa: F811  the name dispatch.py registers ("gla.triton_gla:gla_chunk")
