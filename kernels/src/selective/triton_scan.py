"""Mamba-1 selective scan as Triton kernels (forward + backward), the `triton` backend.

One program owns (batch b, a block of BLOCK_D channels of one B/C group) and walks time
sequentially with the (BLOCK_D, N) state in registers. Forward writes y, the final state and,
when a backward will follow, the state at every CHUNK-th step (L/CHUNK checkpoints, not L).
Backward walks the chunks in reverse: it recomputes the chunk's states from its checkpoint into a
per-program scratch buffer, then runs the reverse recurrence (formulas in scan_cpu.cpp). dB/dC
are reduced over the program's channels in registers and written as per-block partials that the
host sums (no atomics, deterministic); dA likewise per batch.

On CPU this runs under the Triton interpreter (TRITON_INTERPRET=1), which tests use at small
sizes. Whether the interpreter is on is decided when `triton.jit` wraps the kernels, i.e. when
this module is first imported: import it only after setting the variable.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch

from .common import scan_with_core

CHUNK = 64  # steps between state checkpoints (backward scratch is CHUNK x BLOCK_D x N per program)


@triton.jit
def _fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, hL_ptr, ckpt_ptr,
                D, L, N, G, DPG, NBLK, NCHUNK,
                HAS_H0: tl.constexpr, SAVE_CKPT: tl.constexpr, CHUNK_T: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid = tl.program_id(1)
    g = pid // NBLK
    dl = (pid % NBLK) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = dl < DPG
    d = g * DPG + dl
    n = tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    sn = (pid_b * D + d)[:, None] * N + n[None, :]  # offsets into (Bt, D, N) tensors
    if HAS_H0:
        h = tl.load(h0_ptr + sn, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    row = (pid_b * D + d).to(tl.int64) * L  # offsets into (Bt, D, L) tensors (int64: Bt*D*L may pass 2^31)
    bc = (pid_b * G + g) * N * L + n * L  # offsets into (Bt, G, N, L) tensors
    for c in range(0, NCHUNK):
        if SAVE_CKPT:
            tl.store(ckpt_ptr + ((pid_b * D + d)[:, None] * NCHUNK + c) * N + n[None, :], h, mask=mask_dn)
        for tt in range(0, CHUNK_T):
            t = c * CHUNK_T + tt
            # masks built as tensors: the interpreter rejects `tensor_mask & python_bool`
            md = mask_d & ((dl * 0 + t) < L)
            mn = mask_n & ((n * 0 + t) < L)
            # past the end dt = u = 0: exp(0) = 1 and no input, so h passes through unchanged
            u = tl.load(u_ptr + row + t, mask=md, other=0.0)
            dt = tl.load(dt_ptr + row + t, mask=md, other=0.0)
            Bt = tl.load(B_ptr + bc + t, mask=mn, other=0.0)
            Ct = tl.load(C_ptr + bc + t, mask=mn, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1)
            tl.store(y_ptr + row + t, y, mask=md)
    tl.store(hL_ptr + sn, h, mask=mask_dn)


@triton.jit
def _bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, dy_ptr, dhL_ptr, ckpt_ptr, scratch_ptr,
                du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dh0_ptr,
                D, L, N, G, DPG, NBLK, NCHUNK,
                HAS_DHL: tl.constexpr, CHUNK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid = tl.program_id(1)
    g = pid // NBLK
    blk = pid % NBLK
    dl = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = dl < DPG
    d = g * DPG + dl
    n = tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    sn = (pid_b * D + d)[:, None] * N + n[None, :]
    if HAS_DHL:
        dh = tl.load(dhL_ptr + sn, mask=mask_dn, other=0.0)
    else:
        dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    row = (pid_b * D + d).to(tl.int64) * L
    bc = (pid_b * G + g) * N * L + n * L
    # dB/dC partials: (Bt, G, NBLK, N, L); scratch: (programs, CHUNK, BLOCK_D, BLOCK_N)
    part = ((pid_b * G + g) * NBLK + blk) * N * L + n * L
    scr = (pid_b * G * NBLK + pid) * CHUNK_T * BLOCK_D * BLOCK_N + \
        tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    for cc in range(0, NCHUNK):
        c = NCHUNK - 1 - cc
        h = tl.load(ckpt_ptr + ((pid_b * D + d)[:, None] * NCHUNK + c) * N + n[None, :], mask=mask_dn, other=0.0)
        for tt in range(0, CHUNK_T):  # recompute: scratch[tt] = h_{t-1}
            t = c * CHUNK_T + tt
            md = mask_d & ((dl * 0 + t) < L)
            mn = mask_n & ((n * 0 + t) < L)
            tl.store(scratch_ptr + scr + tt * BLOCK_D * BLOCK_N, h)
            u = tl.load(u_ptr + row + t, mask=md, other=0.0)
            dt = tl.load(dt_ptr + row + t, mask=md, other=0.0)
            Bt = tl.load(B_ptr + bc + t, mask=mn, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        tl.debug_barrier()  # scratch written above is read back below, possibly by other threads
        for tt2 in range(0, CHUNK_T):
            tt = CHUNK_T - 1 - tt2
            t = c * CHUNK_T + tt
            md = mask_d & ((dl * 0 + t) < L)
            mn = mask_n & ((n * 0 + t) < L)
            hp = tl.load(scratch_ptr + scr + tt * BLOCK_D * BLOCK_N)
            u = tl.load(u_ptr + row + t, mask=md, other=0.0)
            dt = tl.load(dt_ptr + row + t, mask=md, other=0.0)
            gy = tl.load(dy_ptr + row + t, mask=md, other=0.0)
            Bt = tl.load(B_ptr + bc + t, mask=mn, other=0.0)
            Ct = tl.load(C_ptr + bc + t, mask=mn, other=0.0)
            ea = tl.exp(dt[:, None] * A)
            dtu = dt * u
            h = ea * hp + dtu[:, None] * Bt[None, :]
            dh = dh + gy[:, None] * Ct[None, :]
            tl.store(dC_ptr + part + t, tl.sum(gy[:, None] * h, axis=0), mask=mn)
            tl.store(dB_ptr + part + t, tl.sum(dh * dtu[:, None], axis=0), mask=mn)
            sb = tl.sum(dh * Bt[None, :], axis=1)
            glog = dh * ea * hp
            tl.store(du_ptr + row + t, dt * sb, mask=md)
            tl.store(ddt_ptr + row + t, u * sb + tl.sum(glog * A, axis=1), mask=md)
            dA_acc += glog * dt[:, None]
            dh = dh * ea
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(dh0_ptr + sn, dh, mask=mask_dn)
    tl.store(dA_ptr + sn, dA_acc, mask=mask_dn)


def _launch_dims(D, G, N):
    dpg = D // G
    block_d = min(triton.next_power_of_2(dpg), 32)
    return dpg, block_d, triton.next_power_of_2(N), triton.cdiv(dpg, block_d)


class _ScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, Bg, Cg, h0):
        u, dt, A, Bg, Cg = (t.contiguous() for t in (u, dt, A, Bg, Cg))
        h0 = None if h0 is None else h0.contiguous()
        bsz, D, L = u.shape
        G, N = Bg.shape[1], A.shape[1]
        dpg, block_d, block_n, nblk = _launch_dims(D, G, N)
        nchunk = triton.cdiv(L, CHUNK)
        save = any(ctx.needs_input_grad)  # forward of a Function runs with grad mode off
        y = torch.empty_like(u)
        hL = torch.empty(bsz, D, N, device=u.device, dtype=torch.float32)
        ckpt = torch.empty(bsz, D, nchunk if save else 1, N, device=u.device, dtype=torch.float32)
        _fwd_kernel[(bsz, G * nblk)](u, dt, A, Bg, Cg, h0 if h0 is not None else hL, y, hL, ckpt,
                                     D, L, N, G, dpg, nblk, nchunk,
                                     HAS_H0=h0 is not None, SAVE_CKPT=save, CHUNK_T=CHUNK,
                                     BLOCK_D=block_d, BLOCK_N=block_n)
        ctx.save_for_backward(u, dt, A, Bg, Cg, ckpt)
        ctx.has_h0 = h0 is not None
        return y, hL

    @staticmethod
    def backward(ctx, dy, dhL):
        u, dt, A, Bg, Cg, ckpt = ctx.saved_tensors
        bsz, D, L = u.shape
        G, N = Bg.shape[1], A.shape[1]
        dpg, block_d, block_n, nblk = _launch_dims(D, G, N)
        nchunk = ckpt.shape[2]
        dy = torch.zeros_like(u) if dy is None else dy.float().contiguous()
        has_dhl = dhL is not None
        dhL = dhL.float().contiguous() if has_dhl else dy  # placeholder pointer when absent
        f32 = dict(device=u.device, dtype=torch.float32)
        du, ddt = torch.empty_like(u), torch.empty_like(u)
        dA = torch.empty(bsz, D, N, **f32)
        dh0 = torch.empty(bsz, D, N, **f32)
        dB = torch.empty(bsz, G, nblk, N, L, **f32)
        dC = torch.empty(bsz, G, nblk, N, L, **f32)
        scratch = torch.empty(bsz * G * nblk, CHUNK, block_d, block_n, **f32)
        _bwd_kernel[(bsz, G * nblk)](u, dt, A, Bg, Cg, dy, dhL, ckpt, scratch,
                                     du, ddt, dA, dB, dC, dh0,
                                     D, L, N, G, dpg, nblk, nchunk,
                                     HAS_DHL=has_dhl, CHUNK_T=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n)
        return du, ddt, dA.sum(0), dB.sum(2), dC.sum(2), dh0 if ctx.has_h0 else None


def scan_core(u, dt, A, B, C, h0):
    """Core contract of common.py: u, dt (Bt, D, L); A (D, N); B, C (Bt, G, N, L); h0 (Bt, D, N)|None."""
    return _ScanTriton.apply(u, dt, A, B, C, h0)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Same contract as naive.selective_scan; CUDA tensors, or CPU under TRITON_INTERPRET=1."""
    return scan_with_core(scan_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                          return_last_state)
