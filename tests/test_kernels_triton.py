"""Triton kernels run on CPU under the Triton interpreter (TRITON_INTERPRET=1), at small sizes.

The interpreter must be on before `triton` is first imported in a process (its own library
functions such as tl.sum are wrapped at import), and in a shared pytest session something may
already have imported triton (deepspeed does). So the one collected test here,
`test_triton_kernels_under_interpreter`, runs this same file in a fresh pytest subprocess with
TRITON_INTERPRET=1 and `-o python_functions=check_*`, which collects the `check_*` cases below.
Each case runs forward + backward against naive.py: output, final state, every gradient."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_close
from megaxatl.kernels.conv1d import naive as conv_naive
from megaxatl.kernels.selective import naive as scan_naive
from megaxatl.kernels.ssd import naive as ssd_naive
from megaxatl.kernels.testing import conv_inputs, fwd_bwd, scan_inputs, ssd_inputs

FP32_TOL = 1e-5


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "python_functions=check_*",
           "-o", "addopts=", str(Path(__file__).resolve())]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def tri():
    # check_* cases are collected only by test_triton_kernels_under_interpreter's subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton_kernels_under_interpreter"
    from triton.runtime.interpreter import InterpretedFunction

    from megaxatl.kernels.conv1d import triton_conv
    from megaxatl.kernels.selective import triton_scan
    from megaxatl.kernels.ssd import triton_ssd

    assert isinstance(triton_scan._fwd_kernel, InterpretedFunction)
    with pytest.MonkeyPatch.context() as mp:
        # small chunks / blocks: the interpreter's cost is per step and per program, not per element
        mp.setattr(triton_scan, "CHUNK", 16)
        mp.setattr(triton_conv, "BLOCK_T", 32)
        yield {"triton_scan": triton_scan, "triton_ssd": triton_ssd, "triton_conv": triton_conv}


def _check(ref, out):
    assert out.keys() == ref.keys()
    for key in ref:
        assert_close(out[key], ref[key], FP32_TOL, key)


@pytest.mark.parametrize("kw", [dict(L=1), dict(L=63, groups=2), dict(L=500, bsz=1, groups=None),
                                dict(L=40, groups=None, D=False, z=False, bias=False, h0=False, n=16)],
                         ids=["L1", "L63-full-grouped", "L500", "L40-bare-n16"])
def check_selective_scan(tri, kw):
    inputs = scan_inputs(**kw)
    ref = fwd_bwd(lambda **k: scan_naive.selective_scan(**k, return_last_state=True), inputs)
    out = fwd_bwd(lambda **k: tri["triton_scan"].selective_scan(**k, return_last_state=True), inputs)
    _check(ref, out)


def check_selective_scan_forward_only(tri, nan_empty):
    inputs = scan_inputs(L=20)
    with torch.no_grad():
        y, last = tri["triton_scan"].selective_scan(**inputs, return_last_state=True)
    y_ref, last_ref = scan_naive.selective_scan(**inputs, return_last_state=True)
    assert_close(y, y_ref, FP32_TOL, "y")
    assert_close(last, last_ref, FP32_TOL, "last state")


def check_ssd_scan(tri):
    inputs = ssd_inputs(L=63, bsz=1)
    ref = fwd_bwd(lambda **k: ssd_naive.ssd_scan(**k, chunk_size=16, return_final_states=True), inputs)
    out = fwd_bwd(lambda **k: tri["triton_ssd"].ssd_scan(**k, chunk_size=16, return_final_states=True), inputs)
    _check(ref, out)


@pytest.mark.parametrize("kw", [dict(L=63), dict(L=2, bias=False), dict(L=40, k=2, h0=False)],
                         ids=["L63", "L2-short", "L40-k2"])
def check_causal_conv1d(tri, kw):
    inputs = conv_inputs(**kw)
    act = None if kw.get("bias", True) is False else "silu"
    ref = fwd_bwd(lambda **k: conv_naive.causal_conv1d(**k, activation=act, return_final_state=True), inputs)
    out = fwd_bwd(lambda **k: tri["triton_conv"].causal_conv1d(**k, activation=act, return_final_state=True), inputs)
    _check(ref, out)
