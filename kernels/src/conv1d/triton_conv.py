"""Causal depthwise conv1d as Triton kernels (forward + backward), the `triton` backend.

The input is taken with its history prepended, xp = [initial_state or 0, x]: (Bt, d, k-1+L), so
y_t = bias + sum_j w_j xp_{t+j}. One program per (batch, channel block, time block).
Backward: kernel 1 recomputes the pre-activation, writes g = dy * act'(pre) and per-time-block
partials of dw and dbias (summed on the host: deterministic, no atomics); kernel 2 forms
dxp_s = sum_j w_j g_{s-j}, whose first k-1 positions are the initial state's gradient.
The final state is a slice of xp taken in PyTorch, so its gradient needs no kernel.
Like triton_scan.py, the interpreter (TRITON_INTERPRET=1) is fixed at first import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_conv_args, with_history

BLOCK_T = 64


@triton.jit
def _fwd_kernel(xp_ptr, w_ptr, b_ptr, y_ptr, D, L, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_b, pid_d, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    md, mt = d < D, t < L
    m = md[:, None] & mt[None, :]
    LP = L + K - 1
    rows = (pid_b * D + d).to(tl.int64) * LP
    acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(w_ptr + d * K + j, mask=md, other=0.0)
        xv = tl.load(xp_ptr + rows[:, None] + (t + j)[None, :], mask=m, other=0.0)
        acc += w[:, None] * xv
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=md, other=0.0)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + (pid_b * D + d).to(tl.int64)[:, None] * L + t[None, :], acc, mask=m)


@triton.jit
def _bwd_g_kernel(xp_ptr, w_ptr, b_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr, D, L, NT,
                  K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_b, pid_d, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    md, mt = d < D, t < L
    m = md[:, None] & mt[None, :]
    LP = L + K - 1
    rows = (pid_b * D + d).to(tl.int64) * LP
    yo = (pid_b * D + d).to(tl.int64)[:, None] * L + t[None, :]
    g = tl.load(dy_ptr + yo, mask=m, other=0.0)
    if SILU:  # recompute the pre-activation; silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)
        pre = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        for j in tl.static_range(K):
            w = tl.load(w_ptr + d * K + j, mask=md, other=0.0)
            pre += w[:, None] * tl.load(xp_ptr + rows[:, None] + (t + j)[None, :], mask=m, other=0.0)
        if HAS_BIAS:
            pre += tl.load(b_ptr + d, mask=md, other=0.0)[:, None]
        s = tl.sigmoid(pre)
        g = g * s * (1.0 + pre * (1.0 - s))
    tl.store(g_ptr + yo, g, mask=m)
    part = ((pid_b * NT + pid_t) * D + d) * K  # dw partials: (Bt, NT, D, K)
    for j in tl.static_range(K):
        xv = tl.load(xp_ptr + rows[:, None] + (t + j)[None, :], mask=m, other=0.0)
        tl.store(dw_ptr + part + j, tl.sum(g * xv, axis=1), mask=md)
    tl.store(db_ptr + (pid_b * NT + pid_t) * D + d, tl.sum(g, axis=1), mask=md)


@triton.jit
def _bwd_x_kernel(g_ptr, w_ptr, dxp_ptr, D, L, K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_b, pid_d, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    s = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # positions in xp: 0 .. L+K-2
    LP = L + K - 1
    md = d < D
    acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    grow = (pid_b * D + d).to(tl.int64) * L
    for j in tl.static_range(K):  # xp_s feeds y_{s-j} through w_j
        w = tl.load(w_ptr + d * K + j, mask=md, other=0.0)
        tj = s - j
        mj = md[:, None] & ((tj >= 0) & (tj < L))[None, :]
        acc += w[:, None] * tl.load(g_ptr + grow[:, None] + tj[None, :], mask=mj, other=0.0)
    tl.store(dxp_ptr + (pid_b * D + d).to(tl.int64)[:, None] * LP + s[None, :], acc,
             mask=md[:, None] & (s < LP)[None, :])


def _grid_dims(D):
    return min(triton.next_power_of_2(D), 16)


class _ConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, w, bias, silu):
        xp, w = xp.contiguous(), w.contiguous()
        bsz, D, LP = xp.shape
        K = w.shape[1]
        L = LP - (K - 1)
        bd = _grid_dims(D)
        y = torch.empty(bsz, D, L, device=xp.device, dtype=torch.float32)
        grid = (bsz, triton.cdiv(D, bd), triton.cdiv(L, BLOCK_T))
        _fwd_kernel[grid](xp, w, bias if bias is not None else w, y, D, L, K=K, HAS_BIAS=bias is not None,
                          SILU=silu, BLOCK_D=bd, BLOCK_T=BLOCK_T)
        ctx.save_for_backward(xp, w, bias)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        xp, w, bias = ctx.saved_tensors
        bsz, D, LP = xp.shape
        K = w.shape[1]
        L = LP - (K - 1)
        bd, nt = _grid_dims(D), triton.cdiv(L, BLOCK_T)
        f32 = dict(device=xp.device, dtype=torch.float32)
        g = torch.empty(bsz, D, L, **f32)
        dw = torch.empty(bsz, nt, D, K, **f32)
        db = torch.empty(bsz, nt, D, **f32)
        _bwd_g_kernel[(bsz, triton.cdiv(D, bd), nt)](
            xp, w, bias if bias is not None else w, dy.float().contiguous(), g, dw, db, D, L, nt,
            K=K, HAS_BIAS=bias is not None, SILU=ctx.silu, BLOCK_D=bd, BLOCK_T=BLOCK_T)
        dxp = torch.empty(bsz, D, LP, **f32)
        _bwd_x_kernel[(bsz, triton.cdiv(D, bd), triton.cdiv(LP, BLOCK_T))](g, w, dxp, D, L, K=K, BLOCK_D=bd,
                                                                             BLOCK_T=BLOCK_T)
        return dxp, dw.sum((0, 1)), None if bias is None else db.sum((0, 1)), None


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False):
    """Same contract as naive.causal_conv1d; CUDA tensors, or CPU under TRITON_INTERPRET=1."""
    check_conv_args(x, weight, bias, activation, initial_state)
    k = weight.shape[1]
    xp = with_history(x.float(), None if initial_state is None else initial_state.float(), k)
    y = _ConvTriton.apply(xp, weight.float(), None if bias is None else bias.float().contiguous(),
                          activation is not None).to(x.dtype)
    if not return_final_state:
        return y
    return y, xp[:, :, xp.shape[-1] - (k - 1):].to(x.dtype)
