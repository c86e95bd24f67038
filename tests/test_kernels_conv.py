"""Causal depthwise conv1d: the F.conv1d backend vs the sequential reference (naive.py)."""

import pytest
import torch

from helpers import assert_close
from megaxatl.kernels import dispatch
from megaxatl.kernels.conv1d import naive
from megaxatl.kernels.testing import conv_inputs, fwd_bwd

FP32_TOL, BF16_TOL = 1e-5, 1e-2


def _call(fn, activation):
    return lambda **kw: fn(**kw, activation=activation, return_final_state=True)


def _compare(inputs, activation, tol, name="torch"):
    ref = fwd_bwd(_call(naive.causal_conv1d, activation), inputs)
    out = fwd_bwd(_call(dispatch.load("causal_conv1d", name), activation), inputs)
    assert out.keys() == ref.keys()
    for key in ref:
        assert out[key].dtype == ref[key].dtype, key
        assert_close(out[key], ref[key], tol, f"{name} {key}")


CASES = {  # name: (inputs, activation)
    "L1-state": (dict(L=1), "silu"),  # L < k-1: the final state mixes initial state and x
    "L2-nostate": (dict(L=2, h0=False), None),
    "L63-silu": (dict(L=63), "silu"),
    "L63-bare": (dict(L=63, bias=False, h0=False), None),
    "L500-k2": (dict(L=500, k=2), "silu"),
    "L500-k1": (dict(L=500, k=1), None),
    "L2048": (dict(L=2048, bsz=1, d=3), "silu"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    inputs, act = CASES[case]
    _compare(conv_inputs(**inputs), act, FP32_TOL)


def test_matches_reference_bf16():
    _compare(conv_inputs(L=63, dtype=torch.bfloat16), "silu", BF16_TOL)


def test_final_state_is_last_inputs():
    inp = conv_inputs(L=10)
    _, final = dispatch.load("causal_conv1d", "torch")(**inp, return_final_state=True)
    assert torch.equal(final, inp["x"][..., -3:])
    short = conv_inputs(L=1, h0=False)
    _, final = dispatch.load("causal_conv1d", "torch")(**short, return_final_state=True)
    assert torch.equal(final[..., :2], torch.zeros(2, 6, 2)) and torch.equal(final[..., 2], short["x"][..., 0])


@pytest.mark.parametrize("name", ["naive", "torch"])
def test_forward_writes_every_output(name, nan_empty):
    y, final = dispatch.load("causal_conv1d", name)(**conv_inputs(L=70), activation="silu", return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()


def test_chunked_prefill_equals_one_pass():
    fn = dispatch.load("causal_conv1d", "torch")
    inp = conv_inputs(L=40)
    y_full, s_full = fn(**inp, activation="silu", return_final_state=True)
    y1, s1 = fn(**dict(inp, x=inp["x"][..., :2]), activation="silu", return_final_state=True)  # shorter than k-1
    y2, s2 = fn(**dict(inp, x=inp["x"][..., 2:], initial_state=s1), activation="silu", return_final_state=True)
    assert_close(torch.cat([y1, y2], -1), y_full, FP32_TOL, "prefill y")
    assert torch.equal(s2, s_full)


def test_decode_steps_equal_conv():
    inp = conv_inputs(L=12)
    y_ref, s_ref = naive.causal_conv1d(**inp, activation="silu", return_final_state=True)
    step = dispatch.load("causal_conv1d_update", dispatch.backend_for("causal_conv1d_update", "cpu"))
    state, ys = inp["initial_state"].clone(), []
    for t in range(12):
        before = state.clone()
        y, state2 = step(inp["x"][..., t], state, inp["weight"], inp["bias"], "silu")
        assert torch.equal(state, before), "the step must not modify its input state"
        state = state2
        ys.append(y)
    assert_close(torch.stack(ys, -1), y_ref, FP32_TOL, "decode y")
    assert torch.equal(state, s_ref)


def test_rejects_bad_args():
    inp = conv_inputs(L=5)
    with pytest.raises(ValueError, match="activation"):
        naive.causal_conv1d(**inp, activation="relu")
    with pytest.raises(ValueError, match="initial_state must be"):
        dispatch.load("causal_conv1d", "torch")(**dict(inp, initial_state=inp["initial_state"][..., :1]))
