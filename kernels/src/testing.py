"""Test utilities for kernel backends: random inputs in mamba-ssm layouts; one forward+backward
that returns the output, the state and every input gradient, so a backend can be compared
against naive.py entry by entry (used by tests/test_kernels_*.py and the benchmarks); and
`cuda_contracts`, which checks every dispatched call's arguments as the external GPU kernel would."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Iterator

import torch

from . import dispatch


@contextlib.contextmanager
def cuda_contracts() -> Iterator[Counter]:
    """Within: every dispatched op call (whatever backend runs it, e.g. `cpu` in a CPU test) first
    runs its `cuda` backend's `prepare_*` on the same arguments with the device checks off, so an
    argument mamba-ssm / causal-conv1d / fla would reject (layout, strides, dtype, shape) raises
    ContractError here, on CPU. Yields {op: calls checked}; ops without a contract (decode steps)
    are not counted."""
    checked: Counter = Counter()

    def hook(op: str, impl: Callable) -> Callable:
        check = dispatch.contract_of(op)
        if check is None:
            return impl

        def checked_call(*args, **kwargs):
            check(*args, **kwargs, device_checks=False)
            checked[op] += 1
            return impl(*args, **kwargs)
        return checked_call

    before = dispatch._CONTRACT_HOOK
    dispatch._CONTRACT_HOOK = hook
    try:
        yield checked
    finally:
        dispatch._CONTRACT_HOOK = before


def scan_inputs(bsz=2, d=8, L=63, n=5, groups: int | None = 2, D=True, z=True, bias=True, h0=True,
                dtype=torch.float32) -> dict:
    """selective_scan kwargs: u, delta, z (Bt, d, L); A (d, n) < 0; B, C (Bt, [G,] n, L); D, delta_bias (d,);
    initial_state (Bt, d, n) fp32. delta_softplus is on exactly when a bias is given."""
    bc = (bsz, n, L) if groups is None else (bsz, groups, n, L)
    return dict(
        u=torch.randn(bsz, d, L, dtype=dtype),
        # with softplus delta is a pre-activation; without, it is dt itself and must be > 0
        delta=((0.5 * torch.randn(bsz, d, L) - 1.0) if bias else (0.05 + 0.3 * torch.rand(bsz, d, L))).to(dtype),
        A=-(0.5 + 4 * torch.rand(d, n)),
        B=torch.randn(bc, dtype=dtype), C=torch.randn(bc, dtype=dtype),
        D=torch.randn(d) if D else None,
        z=torch.randn(bsz, d, L, dtype=dtype) if z else None,
        delta_bias=0.5 * torch.randn(d) if bias else None,
        delta_softplus=bias,
        initial_state=torch.randn(bsz, d, n) if h0 else None,
    )


def ssd_inputs(bsz=2, L=63, heads=4, headdim=3, groups=2, n=5, D="hp", z=True, bias=True, h0=True,
               dtype=torch.float32) -> dict:
    """ssd_scan kwargs (without chunk_size): x, z (Bt, L, H, P); dt (Bt, L, H); A (H,) < 0;
    B, C (Bt, L, G, n); D (H,) or (H, P) or None; dt_bias (H,); initial_states (Bt, H, P, n)."""
    Dt = {"h": torch.randn(heads), "hp": torch.randn(heads, headdim), None: None}[D]
    return dict(
        x=torch.randn(bsz, L, heads, headdim, dtype=dtype),
        dt=(0.5 * torch.randn(bsz, L, heads) - 1.0).to(dtype),
        A=-(0.5 + 4 * torch.rand(heads)),
        B=torch.randn(bsz, L, groups, n, dtype=dtype), C=torch.randn(bsz, L, groups, n, dtype=dtype),
        D=Dt, z=torch.randn(bsz, L, heads, headdim, dtype=dtype) if z else None,
        dt_bias=0.5 * torch.randn(heads) if bias else None, dt_softplus=True,
        initial_states=torch.randn(bsz, heads, headdim, n) if h0 else None,
    )


def conv_inputs(bsz=2, d=6, L=63, k=4, bias=True, h0=True, dtype=torch.float32) -> dict:
    """causal_conv1d kwargs: x (Bt, d, L); weight (d, k); bias (d,); initial_state (Bt, d, k-1)."""
    return dict(x=torch.randn(bsz, d, L, dtype=dtype), weight=torch.randn(d, k) / k ** 0.5,
                bias=torch.randn(d) if bias else None,
                initial_state=torch.randn(bsz, d, k - 1, dtype=dtype) if h0 else None)


def fwd_bwd(call: Callable[..., tuple], inputs: dict, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Run `call(**inputs)` -> (y, state) on fresh leaf copies, backprop a fixed random projection
    of both, and return {"y", "state", "d<name>" for every floating tensor input}.
    A floating input that receives no gradient is an error (every gradient must be checked)."""
    leaves = {k: (v.detach().clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    y, state = call(**leaves)
    g = torch.Generator().manual_seed(seed)
    # torch.randn(shape), not randn_like: randn_like follows y's strides, which differ by backend
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum()
    loss = loss + (state.float() * torch.randn(state.shape, generator=g)).sum()
    loss.backward()
    out = {"y": y.detach(), "state": state.detach()}
    for k, v in leaves.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            if v.grad is None:
                raise AssertionError(f"no gradient reached input {k!r}")
            out[f"d{k}"] = v.grad
    return out
