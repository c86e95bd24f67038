"""Mamba-2 SSD scan: the chunked backend vs the sequential reference (naive.py).

Forward output, final state and every input gradient, relative RMS error (tests/helpers.py).
Chunk sizes are picked so L is not a multiple of the chunk."""

import pytest
import torch

from helpers import assert_close
from megaxatl.kernels import dispatch
from megaxatl.kernels.ssd import naive
from megaxatl.kernels.testing import fwd_bwd, ssd_inputs

FP32_TOL, BF16_TOL = 1e-5, 1e-2


def _call(fn, chunk):
    return lambda **kw: fn(**kw, chunk_size=chunk, return_final_states=True)


def _compare(inputs, chunk, tol, name="torch"):
    ref = fwd_bwd(_call(naive.ssd_scan, chunk), inputs)
    out = fwd_bwd(_call(dispatch.load("ssd_scan", name), chunk), inputs)
    assert out.keys() == ref.keys()
    for key in ref:
        assert out[key].dtype == ref[key].dtype, key
        assert_close(out[key], ref[key], tol, f"{name} {key}")


CASES = {  # name: (inputs, chunk_size)
    "L1": (dict(L=1), 16),
    "L63-chunk16-full": (dict(L=63), 16),
    "L63-chunk64-bare": (dict(L=63, D=None, z=False, bias=False, h0=False), 64),
    "L63-chunk8-Dh-g1": (dict(L=63, D="h", groups=1, n=8), 8),
    "L500-chunk64-g4": (dict(L=500, heads=4, groups=4, z=False), 64),
    "L500-chunk1": (dict(L=500, bsz=1, heads=2, groups=1, headdim=2, z=False), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    inputs, chunk = CASES[case]
    _compare(ssd_inputs(**inputs), chunk, FP32_TOL)


def test_matches_reference_long():
    _compare(ssd_inputs(bsz=1, L=2048, heads=2, headdim=2, groups=1, n=4, z=False), 256, FP32_TOL)


def test_matches_reference_bf16():
    _compare(ssd_inputs(L=63, dtype=torch.bfloat16), 16, BF16_TOL)


def test_cpu_backend_is_the_chunked_form():
    assert dispatch.load("ssd_scan", "cpu") is dispatch.load("ssd_scan", "torch")


@pytest.mark.parametrize("name", ["naive", "torch"])
def test_forward_writes_every_output(name, nan_empty):
    inputs = ssd_inputs(L=70)
    y, final = dispatch.load("ssd_scan", name)(**inputs, chunk_size=32, return_final_states=True)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert final.dtype == torch.float32


def test_chunked_prefill_equals_one_pass():
    fn = dispatch.load("ssd_scan", "torch")
    inp = ssd_inputs(L=90)
    y_full, h_full = fn(**inp, chunk_size=16, return_final_states=True)
    cut = 37

    def part(sl, h0):
        kw = dict(inp, initial_states=h0)
        for k in ("x", "dt", "B", "C", "z"):
            kw[k] = inp[k][:, sl]
        return fn(**kw, chunk_size=16, return_final_states=True)

    y1, h1 = part(slice(0, cut), inp["initial_states"])
    y2, h2 = part(slice(cut, None), h1)
    assert_close(torch.cat([y1, y2], 1), y_full, FP32_TOL, "prefill y")
    assert_close(h2, h_full, FP32_TOL, "prefill state")


def test_decode_steps_equal_scan():
    inp = ssd_inputs(L=25)
    y_ref, h_ref = naive.ssd_scan(**inp, chunk_size=8, return_final_states=True)
    step = dispatch.load("ssd_state_update", dispatch.backend_for("ssd_state_update", "cpu"))
    state, ys = inp["initial_states"].clone(), []
    for t in range(25):
        before = state.clone()
        y, state2 = step(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                         D=inp["D"], z=inp["z"][:, t], dt_bias=inp["dt_bias"], dt_softplus=True)
        assert torch.equal(state, before), "the step must not modify its input state"
        state = state2
        ys.append(y)
    assert_close(torch.stack(ys, 1), y_ref, FP32_TOL, "decode y")
    assert_close(state, h_ref, FP32_TOL, "decode state")


def test_no_overflow_with_strong_decay():
    """Large dt*A (decay to ~0 within a chunk) must not produce inf/nan (no exp(+large))."""
    inp = ssd_inputs(L=200)
    inp["A"] = torch.full((4,), -60.0)
    inp["dt_bias"] = torch.full((4,), 3.0)
    out = fwd_bwd(_call(dispatch.load("ssd_scan", "torch"), 64), inp)
    ref = fwd_bwd(_call(naive.ssd_scan, 64), inp)
    for key in ref:
        assert_close(out[key], ref[key], FP32_TOL, key)


def test_rejects_bad_shapes():
    inp = ssd_inputs(L=5)
    with pytest.raises(ValueError, match="multiple of groups"):
        naive.ssd_scan(**ssd_inputs(L=5, heads=3, groups=2), chunk_size=4)
    with pytest.raises(ValueError, match="dt must be"):
        dispatch.load("ssd_scan", "torch")(**dict(inp, dt=inp["dt"][:, :-1]), chunk_size=4)
