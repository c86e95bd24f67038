"""Mamba-1 selective scan on CPU through the C++ core in scan_cpu.cpp (the `cpu` backend).

Forward stores nothing per time step; backward recomputes each channel's states into a private
scratch buffer and runs the reverse scan (see scan_cpu.cpp). Threads follow
torch.get_num_threads(). If the library cannot be built, `available()` is False (one warning) and
dispatch falls back to the pure-PyTorch `torch` backend.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch

from .common import scan_with_core

_LIB = None
_ERROR: str | None = None


def _load():
    global _LIB, _ERROR
    if _LIB is None and _ERROR is None:
        from .._cbuild import BuildError, build_and_load

        try:
            lib = build_and_load("selective_scan_cpu", Path(__file__).with_name("scan_cpu.cpp"))
        except (BuildError, OSError) as e:
            _ERROR = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"megaxatl.kernels: C++ selective scan unavailable ({_ERROR}); using the PyTorch fallback",
                          stacklevel=3)
            return None
        P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.ssm_scan_fwd.argtypes = [P] * 8 + [I64] * 5 + [INT]
        lib.ssm_scan_fwd.restype = None
        lib.ssm_scan_bwd.argtypes = [P] * 14 + [I64] * 5 + [INT]
        lib.ssm_scan_bwd.restype = None
        _LIB = lib
    return _LIB


def available() -> bool:
    """True when the C++ core is built (builds it on first call, ~1 s, cached on disk)."""
    return _load() is not None


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


LANES = 16  # the C++ core works on 16-float vectors: N is zero-padded up to a multiple


def _pad_n(t: torch.Tensor | None, n_pad: int) -> torch.Tensor | None:
    """Zero-pad the last dim (the state dim N) by n_pad and make contiguous."""
    if t is None:
        return None
    return (torch.nn.functional.pad(t, (0, n_pad)) if n_pad else t).contiguous()


class _ScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, Bg, Cg, h0):
        bsz, d, L = u.shape
        G, N = Bg.shape[1], A.shape[1]
        n_pad = -N % LANES
        NP = N + n_pad
        u, dt = u.contiguous(), dt.contiguous()
        # zero-padded lanes (A = B = C = h0 = 0) stay exactly 0; B/C go (Bt, G, N, L) -> (Bt, G, L, NP)
        # so one time step's state values are contiguous
        Ap, h0p = _pad_n(A, n_pad), _pad_n(h0, n_pad)
        Bp, Cp = _pad_n(Bg.transpose(2, 3), n_pad), _pad_n(Cg.transpose(2, 3), n_pad)
        y = torch.empty_like(u)
        hL = torch.empty(bsz, d, NP, dtype=torch.float32)
        _LIB.ssm_scan_fwd(_ptr(u), _ptr(dt), _ptr(Ap), _ptr(Bp), _ptr(Cp), _ptr(h0p), _ptr(y), _ptr(hL),
                          bsz, d, L, NP, G, torch.get_num_threads())
        ctx.save_for_backward(u, dt, Ap, Bp, Cp, h0p)
        ctx.has_h0, ctx.N = h0 is not None, N
        return y, hL[..., :N]

    @staticmethod
    def backward(ctx, dy, dhL):
        u, dt, Ap, Bp, Cp, h0p = ctx.saved_tensors
        bsz, d, L = u.shape
        G, NP, N = Bp.shape[1], Ap.shape[1], ctx.N
        nthreads = torch.get_num_threads()
        dy = torch.zeros_like(u) if dy is None else dy.float().contiguous()
        dhL = None if dhL is None else _pad_n(dhL.float(), NP - N)
        du, ddt = torch.empty_like(u), torch.empty_like(u)
        dA = torch.empty(bsz, d, NP, dtype=torch.float32)
        dh0 = torch.empty(bsz, d, NP, dtype=torch.float32)
        # one zeroed (Bt, G, L, NP) slab per thread: threads sum their channels' dB/dC without atomics
        dB = torch.zeros(nthreads, bsz, G, L, NP, dtype=torch.float32)
        dC = torch.zeros(nthreads, bsz, G, L, NP, dtype=torch.float32)
        _LIB.ssm_scan_bwd(_ptr(u), _ptr(dt), _ptr(Ap), _ptr(Bp), _ptr(Cp), _ptr(h0p), _ptr(dy), _ptr(dhL),
                          _ptr(du), _ptr(ddt), _ptr(dA), _ptr(dB), _ptr(dC), _ptr(dh0),
                          bsz, d, L, NP, G, nthreads)
        return (du, ddt, dA.sum(0)[:, :N], dB.sum(0)[..., :N].transpose(2, 3), dC.sum(0)[..., :N].transpose(2, 3),
                dh0[..., :N] if ctx.has_h0 else None)


def scan_core(u, dt, A, B, C, h0):
    """Core contract of common.py: u, dt (Bt, D, L); A (D, N); B, C (Bt, G, N, L); h0 (Bt, D, N)|None."""
    if _load() is None:
        raise RuntimeError(f"the C++ selective scan could not be built: {_ERROR}")
    return _ScanCPU.apply(u, dt, A, B, C, h0)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Same contract as naive.selective_scan; CPU tensors only."""
    return scan_with_core(scan_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                          return_last_state)
