"""Mamba-1 training through the fused `mamba_inner` op: models/mamba.py reaches it (at TP 1, without
a cache), its CPU backend is exactly the mixer's composed path, and the `cuda` backend's call of
mamba-ssm's mamba_inner_fn (argument mapping, dtypes, layouts, prepare_mamba_inner's checks) gives
the composed path's output and every gradient, run here on CPU against a port of mamba-ssm's own
reference (mamba_inner_ref) standing in for the CUDA function.

# GPU path: the real mamba_inner_fn against our composed path is benchmarks/gpu_check.py's
# `inner` section.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from megaxatl.kernels import dispatch, policy, probes
from megaxatl.kernels.conv1d.naive import causal_conv1d as conv_ref
from megaxatl.kernels.selective import inner
from megaxatl.kernels.selective.naive import selective_scan as scan_ref
from megaxatl.models.mamba import Mamba


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                    out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                    delta_softplus=True, checkpoint_lvl=1):
    """mamba-ssm 2.3's mamba_inner_ref (what mamba_inner_fn computes), step for step, with our naive
    conv and scan for causal_conv1d_fn / selective_scan_fn: conv weight (d, 1, k), the projections
    over (b l) rows, delta = delta_proj_weight @ dt^T, B / C sliced from x_dbl as (b, N, l)."""
    assert B is None and C is None and B_proj_bias is None and C_proj_bias is None and delta_softplus
    bsz, _, L = xz.shape
    rank, n = delta_proj_weight.shape[1], A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = conv_ref(x, conv1d_weight.squeeze(1), conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2).reshape(bsz * L, -1), x_proj_weight)  # (b l, R + 2N)
    delta = (delta_proj_weight @ x_dbl[:, :rank].t()).reshape(-1, bsz, L).transpose(0, 1)  # (b, d, l)
    B = x_dbl[:, rank:rank + n].reshape(bsz, L, n).transpose(1, 2).contiguous()
    C = x_dbl[:, -n:].reshape(bsz, L, n).transpose(1, 2).contiguous()
    y = scan_ref(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


@pytest.fixture
def fake_mamba_ssm(monkeypatch):
    """mamba-ssm's interface module with mamba_inner_fn = mamba_inner_ref (counted), its compiled
    modules present, and the `cuda` backend of mamba_inner allowed on CPU tensors (device checks
    off): the backend's own code runs up to the library call."""
    calls = []

    def mamba_inner_fn(*args, **kwargs):
        calls.append(args)
        return mamba_inner_ref(*args, **kwargs)

    iface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    iface.mamba_inner_fn = mamba_inner_fn
    iface.selective_scan_fn = scan_ref
    iface.causal_conv1d_fwd_function = conv_ref
    for name in ("mamba_ssm", "mamba_ssm.ops", "selective_scan_cuda", "causal_conv1d_cuda"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", iface)
    entries = dispatch.REGISTRY["mamba_inner"]
    cuda = next(b for b in entries if b.name == "cuda")
    monkeypatch.setitem(dispatch.REGISTRY, "mamba_inner",
                        [b if b is not cuda else dataclasses.replace(cuda, runs_on=lambda dev: True) for b in entries])
    real_prepare = inner.prepare_mamba_inner
    monkeypatch.setattr(inner, "prepare_mamba_inner", lambda *a, **k: real_prepare(*a, **k, device_checks=False))
    probes.clear()
    monkeypatch.setenv("MEGAXATL_KERNELS_STRICT", "1")
    yield calls
    monkeypatch.undo()
    probes.clear()
    policy.changed()


def mixer(seed=0) -> Mamba:
    torch.manual_seed(seed)
    m = Mamba(24, d_state=5, expand=2.0, proj_bias=True)
    for p in (m.in_proj.weight, m.x_proj.weight, m.out_proj.weight):
        torch.nn.init.normal_(p, std=0.2)
    return m


def run(m: Mamba, backend: str, monkeypatch, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Forward + backward of the mixer with mamba_inner on `backend`: output, input and every
    parameter gradient."""
    monkeypatch.setenv("MEGAXATL_KERNEL_MAMBA_INNER", backend)
    policy.changed()
    m = m.to(dtype)
    m.zero_grad()
    torch.manual_seed(1)
    x = torch.randn(2, 33, 24, dtype=dtype, requires_grad=True)
    y, cache = m(x)
    assert cache is None
    (y.float() * torch.randn(y.shape)).sum().backward()
    return {"y": y.detach(), "dx": x.grad, **{f"d{n}": p.grad.clone() for n, p in m.named_parameters()}}


def test_training_forward_goes_through_the_mamba_inner_op(monkeypatch):
    m = mixer()
    dispatch.used(reset=True)
    fused = run(m, "cpu", monkeypatch)
    used = dispatch.used(reset=True)
    assert used["mamba_inner"] == {"cpu": 1}
    assert used["causal_conv1d"] == {"cpu": 1} and used["selective_scan"] == {"cpu": 1}  # composed inside
    m.fused_inner = False  # what tensor parallelism sets: the mixer's own composed path
    unfused = run(m, "cpu", monkeypatch)
    assert "mamba_inner" not in dispatch.used(reset=True)
    assert fused.keys() == unfused.keys() and all(torch.equal(fused[k], unfused[k]) for k in fused), \
        [k for k in fused if not torch.equal(fused[k], unfused[k])]


def test_cuda_backend_matches_the_composed_path_through_mamba_ssms_reference(monkeypatch, fake_mamba_ssm):
    m = mixer()
    ref = run(m, "torch", monkeypatch)
    got = run(m, "cuda", monkeypatch)
    assert len(fake_mamba_ssm) == 1  # the backend called the library function once
    xz, conv_w, *_ = fake_mamba_ssm[0]
    assert conv_w.shape == (48, 1, 4)  # the (d, 1, k) weight mamba_inner_fn takes
    assert got.keys() == ref.keys()
    for k in ref:
        assert_close(got[k], ref[k], 1e-5, k)


def test_cuda_backend_in_bf16_keeps_the_ssm_parameters_fp32(monkeypatch, fake_mamba_ssm):
    m = mixer()
    got = run(m, "cuda", monkeypatch, dtype=torch.bfloat16)
    args = fake_mamba_ssm[0]
    xz, A, D, delta_bias = args[0], args[7], args[10], args[11]
    assert xz.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in (A, D, delta_bias))
    assert all(t.dtype == torch.bfloat16 for t in args[1:7] if t is not None)  # weights in xz's dtype
    ref = run(m, "torch", monkeypatch, dtype=torch.bfloat16)
    for k in ("y", "dx", "dx_proj.weight", "dA_log"):
        assert_close(got[k].float(), ref[k].float(), 2e-2, k)
