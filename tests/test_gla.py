"""Gated linear attention: the gla_scan kernel backends against the recurrent reference (outputs,
final state, every gradient), the GLA mixer's three forms, and decoding with `G` in a pattern."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from megaxatl import kernels
from megaxatl.config import config_from_dict
from megaxatl.kernels import dispatch
from megaxatl.kernels.gla.chunked import gla_chunk
from megaxatl.kernels.gla.naive import gla_parallel, gla_recurrent, gla_state_update
from megaxatl.kernels.testing import fwd_bwd
from megaxatl.models import build
from megaxatl.models.gla import GLA

TOL = 1e-5


def gla_inputs(bsz=2, L=63, heads=3, dk=5, dv=4, per_dim=True, h0=True, dtype=torch.float32):
    """q, k: (Bt, L, H, K); v: (Bt, L, H, V); g: (Bt, L, H, K or 1) <= 0; initial_state (Bt, H, K, V)."""
    g = F.logsigmoid(torch.randn(bsz, L, heads, dk if per_dim else 1) + 2.0)
    return dict(q=torch.randn(bsz, L, heads, dk, dtype=dtype), k=torch.randn(bsz, L, heads, dk, dtype=dtype),
                v=torch.randn(bsz, L, heads, dv, dtype=dtype), g=g.to(dtype),
                initial_state=torch.randn(bsz, heads, dk, dv) if h0 else None)


def _call(fn, chunk):
    return lambda **kw: fn(scale=0.7, chunk_size=chunk, return_final_state=True, **kw)


@pytest.mark.parametrize("per_dim", [True, False])
@pytest.mark.parametrize("L,chunk,h0", [(1, 16, True), (63, 16, True), (100, 64, False), (63, 10, False)])
def test_scan_forms_match_recurrent(per_dim, L, chunk, h0):
    inputs = gla_inputs(L=L, per_dim=per_dim, h0=h0)
    if not h0:
        inputs.pop("initial_state")
    ref = fwd_bwd(_call(gla_recurrent, chunk), inputs)
    for name, fn in (("parallel", gla_parallel), ("chunk", gla_chunk), ("dispatch", kernels.gla_scan)):
        got = fwd_bwd(_call(fn, chunk), inputs)
        assert set(got) == set(ref)
        for key in ref:
            assert_close(got[key], ref[key], TOL, f"{name} {key}")


def test_scan_writes_every_output(nan_empty):
    inputs = gla_inputs(L=37)
    o, s = gla_chunk(**inputs, chunk_size=8, return_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()


def test_bf16_inputs_compute_in_fp32():
    inputs = gla_inputs(L=40, dtype=torch.bfloat16)
    o, s = gla_chunk(**inputs, chunk_size=16, return_final_state=True)
    ref, rs = gla_recurrent(**inputs, return_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_close(o, ref, 1e-2, "bf16 o")
    assert_close(s, rs, 1e-5, "bf16 state")


def test_strong_decay_is_finite():
    """Differences of cumulative log decays, masked before exp: no overflow at any decay."""
    inputs = gla_inputs(L=64, h0=False)
    inputs["g"] = inputs["g"] * 200.0  # down to ~ -1000 per step
    o = gla_chunk(**inputs, chunk_size=64)
    assert torch.isfinite(o).all()
    assert_close(o, gla_recurrent(**inputs), TOL, "strong decay")


def test_state_update_steps_equal_the_scan():
    inputs = gla_inputs(L=9)
    o_ref, s_ref = gla_recurrent(**inputs, return_final_state=True)
    state = inputs["initial_state"]
    before = state.clone()
    outs = []
    for t in range(9):
        o, state = kernels.gla_state_update(state if t else inputs["initial_state"], *(inputs[n][:, t] for n in "qkvg"))
        outs.append(o)
    assert torch.equal(inputs["initial_state"], before)  # functional: the input state is not modified
    assert_close(torch.stack(outs, 1), o_ref, TOL, "steps o")
    assert_close(state, s_ref, TOL, "steps state")


def test_dispatch_registers_gla_ops(monkeypatch):
    monkeypatch.delenv("MEGAXATL_KERNELS", raising=False)
    monkeypatch.delenv("MEGAXATL_KERNEL_GLA_SCAN", raising=False)
    assert dispatch.backend_for("gla_scan", "cpu") == "cpu"
    assert dispatch.load("gla_scan", "naive") is gla_recurrent
    assert dispatch.load("gla_state_update", "cpu") is gla_state_update
    monkeypatch.setenv("MEGAXATL_KERNEL_GLA_SCAN", "naive")
    assert dispatch.backend_for("gla_scan", "cpu") == "naive"


def _mixer_grads(mixer, x):
    x = x.clone().requires_grad_(True)
    y, _ = mixer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad()
    return y.detach(), x.grad, grads


def assert_forms_agree(mixer, x):
    """The parallel and chunk forms equal the recurrent one: output, input and every parameter grad."""
    results = {}
    for form in ("recurrent", "parallel", "chunk"):
        mixer.form = form
        results[form] = _mixer_grads(mixer, x)
    ry, rdx, rg = results["recurrent"]
    for form in ("parallel", "chunk"):
        y, dx, g = results[form]
        assert_close(y, ry, TOL, f"{form} y")
        assert_close(dx, rdx, TOL, f"{form} dx")
        for n in rg:
            assert_close(g[n], rg[n], TOL, f"{form} d{n}")


@pytest.mark.parametrize("L,chunk,kv", [(63, 10, 4), (100, 16, 2)])
def test_gla_mixer_forms_agree(L, chunk, kv):
    mixer = GLA(32, 4, kv, 8, chunk_size=chunk, gate_low_rank_dim=4)
    with torch.no_grad():  # a visible forget gate: bias spread so decays differ per dim
        mixer.gk_proj[1].bias.normal_(0, 2)
    assert_forms_agree(mixer, torch.randn(2, L, 32))


def tiny_lm(pattern, **over):
    model = dict(vocab_size=97, d_model=32, n_layers=len(pattern), pattern=pattern, n_heads=4, d_mlp=64,
                 rotary_pct=0.5, parallel_residual=True, **over)
    return build(config_from_dict({"model": model}).model).eval()


def decode_matches_forward(model, L=13, prefill=5):
    ids = torch.randint(0, 97, (2, L))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model(ids[:, :prefill], model.empty_cache(2))
        outs = [logits]
        for t in range(prefill, L):
            logits, cache = model(ids[:, t:t + 1], cache)
            outs.append(logits)
        assert_close(torch.cat(outs, 1), full, TOL, "prefill + steps vs forward")
        # chunked prefill in two pieces
        a, cache = model(ids[:, :4], model.empty_cache(2))
        b, _ = model(ids[:, 4:], cache)
        assert_close(torch.cat([a, b], 1), full, TOL, "chunked prefill vs forward")


def test_gla_lm_step_decode_equals_forward():
    decode_matches_forward(tiny_lm("G*G", gla={"chunk_size": 4, "gate_low_rank_dim": 4}))


def test_triton_gla_under_interpreter():
    """The Triton kernel runs in a fresh process with TRITON_INTERPRET=1 (see kernels/README.md)."""
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(here))
    r = subprocess.run([sys.executable, "-c", "import check_triton_gla as c; c.main()"], cwd=here, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_fla_backend_under_interpreter():
    """The `cuda` GLA backend (flash-linear-attention) against naive.py: fla's fused_recurrent kernels
    under TRITON_INTERPRET=1, the chunk kernels' argument mapping through fla's reference functions
    (tests/check_fla_gla.py, in a fresh process like the Triton kernel's check)."""
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(here))
    r = subprocess.run([sys.executable, "-c", "import check_fla_gla as c; c.main()"], cwd=here, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]
