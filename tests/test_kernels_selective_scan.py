"""Mamba-1 selective scan: every CPU backend vs the sequential reference (naive.py).

Forward output, final state and every input gradient, relative RMS error (tests/helpers.py)."""

import pytest
import torch

from helpers import assert_close
from megaxatl.kernels import dispatch
from megaxatl.kernels.selective import naive
from megaxatl.kernels.testing import fwd_bwd, scan_inputs

FP32_TOL, BF16_TOL = 1e-5, 1e-2
BACKENDS = ["torch", "cpu"]


def _impl(name):
    return dispatch.load("selective_scan", name)


def _call(fn):
    return lambda **kw: fn(**kw, return_last_state=True)


def _compare(name, inputs, tol):
    ref = fwd_bwd(_call(naive.selective_scan), inputs)
    out = fwd_bwd(_call(_impl(name)), inputs)
    assert out.keys() == ref.keys()
    for key in ref:
        assert out[key].dtype == ref[key].dtype, key
        assert_close(out[key], ref[key], tol, f"{name} {key}")


CASES = {
    "L1-full-grouped": dict(L=1),
    "L63-full-ungrouped": dict(L=63, groups=None),
    "L63-bare-grouped": dict(L=63, D=False, z=False, bias=False, h0=False),
    "L63-n16-g4": dict(L=63, n=16, groups=4),
    "L500-full-grouped": dict(L=500, d=6, groups=3),
    "L500-no-h0-n17": dict(L=500, n=17, groups=None, h0=False),
}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(name, case):
    _compare(name, scan_inputs(**CASES[case]), FP32_TOL)


@pytest.mark.parametrize("name", BACKENDS)
def test_matches_reference_long(name):
    _compare(name, scan_inputs(bsz=1, d=4, L=2048, n=4, groups=None, z=False), FP32_TOL)


@pytest.mark.parametrize("name", BACKENDS)
def test_matches_reference_bf16(name):
    """bf16 in/out, fp32 inside: error is bf16 rounding of y and of each input's gradient."""
    _compare(name, scan_inputs(L=63, dtype=torch.bfloat16), BF16_TOL)


@pytest.mark.parametrize("name", ["naive"] + BACKENDS)
def test_forward_writes_every_output(name, nan_empty):
    inputs = scan_inputs(L=70)
    y, last = _impl(name)(**inputs, return_last_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    with torch.no_grad():  # inference mode path (no checkpoints saved)
        y2 = _impl(name)(**inputs)
    assert_close(y2, y, 0.0, name)


@pytest.mark.parametrize("name", BACKENDS)
def test_chunked_prefill_equals_one_pass(name):
    fn = _impl(name)
    inp = scan_inputs(L=90)
    y_full, h_full = fn(**inp, return_last_state=True)
    cut = 37

    def part(sl, h0):
        kw = dict(inp, initial_state=h0)
        for k in ("u", "delta", "z"):
            kw[k] = inp[k][..., sl]
        kw["B"], kw["C"] = inp["B"][..., sl], inp["C"][..., sl]
        return fn(**kw, return_last_state=True)

    y1, h1 = part(slice(0, cut), inp["initial_state"])
    y2, h2 = part(slice(cut, None), h1)
    assert_close(torch.cat([y1, y2], -1), y_full, FP32_TOL, "prefill y")
    assert_close(h2, h_full, FP32_TOL, "prefill state")


@pytest.mark.parametrize("groups", [None, 2])
def test_decode_steps_equal_scan(groups):
    inp = scan_inputs(L=25, groups=groups)
    y_ref, h_ref = naive.selective_scan(**inp, return_last_state=True)
    step = dispatch.load("selective_state_update", dispatch.backend_for("selective_state_update", "cpu"))
    state, ys = inp["initial_state"].clone(), []
    for t in range(25):
        before = state.clone()
        y, state2 = step(state, inp["u"][..., t], inp["delta"][..., t], inp["A"], inp["B"][..., t],
                         inp["C"][..., t], D=inp["D"], z=inp["z"][..., t], dt_bias=inp["delta_bias"],
                         dt_softplus=inp["delta_softplus"])
        assert torch.equal(state, before), "the step must not modify its input state"
        state = state2
        ys.append(y)
    assert_close(torch.stack(ys, -1), y_ref, FP32_TOL, "decode y")
    assert_close(state, h_ref, FP32_TOL, "decode state")


def test_rejects_bad_shapes():
    inp = scan_inputs(L=5)
    with pytest.raises(ValueError, match="A must be"):
        naive.selective_scan(**dict(inp, A=inp["A"][:-1]))
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        _impl("torch")(**scan_inputs(L=5, d=6, groups=4))
