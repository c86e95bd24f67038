"""Run by tests/test_gla.py::test_fla_backend_under_interpreter in a fresh process with
TRITON_INTERPRET=1: our `cuda` GLA backend (kernels/src/gla/fla.py) against naive.py.

1. Decode steps through fla's real fused_recurrent kernels (they run under the interpreter).
2. The scan's argument mapping (per-key-dim g -> chunk_gla; a per-head g -> chunk_simple_gla with g;
   a constant per-head g -> g_gamma) with fla's chunk kernels replaced by fla's own reference
   functions (naive.py in fla), which compute what chunk_gla / chunk_simple_gla are documented to
   compute: the chunk kernels' Triton loops do not run under the interpreter. On a GPU
   benchmarks/gpu_check.py compares the real chunk kernels with naive.
"""

import os

import torch
import torch.nn.functional as F
import triton.runtime.autotuner as autotuner

from helpers import assert_close
from megaxatl.kernels.gla import fla as fla_backend
from megaxatl.kernels.gla.naive import gla_recurrent, gla_state_update
from megaxatl.kernels.testing import fwd_bwd

# The interpreter has no benchmarker for fla's autotuned kernels: every config times the same.
autotuner.Autotuner._bench = lambda self, *args, config=None, **kwargs: [1.0, 1.0, 1.0]


def inputs(L, per_dim, H=2, K=6, V=4, bsz=2):
    g = F.logsigmoid(torch.randn(bsz, L, H, K if per_dim else 1) + 2.0)
    return dict(q=torch.randn(bsz, L, H, K), k=torch.randn(bsz, L, H, K), v=torch.randn(bsz, L, H, V), g=g,
                initial_state=torch.randn(bsz, H, K, V))


def check_decode_steps():
    for per_dim in (True, False):
        inp = inputs(1, per_dim)
        state = inp["initial_state"]
        before = state.clone()
        step = {n: inp[n][:, 0] for n in "qkvg"}
        o, new = fla_backend.gla_state_update(state, **step, scale=0.7)
        ro, rnew = gla_state_update(state, **step, scale=0.7)
        assert torch.equal(state, before), "the input state was modified"
        assert new.dtype == torch.float32
        assert_close(o, ro, 1e-5, f"fla step o per_dim={per_dim}")
        assert_close(new, rnew, 1e-5, f"fla step state per_dim={per_dim}")


def fla_reference(name):
    """fla's reference functions, called with chunk_gla's / chunk_simple_gla's arguments."""
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    if name == "chunk_gla":
        def chunk_gla(q, k, v, g, scale, initial_state, output_final_state):
            # naive_recurrent_gla scales q by K**-0.5 itself
            return naive_recurrent_gla(q * (scale * q.shape[-1] ** 0.5), k, v, g, initial_state, output_final_state)
        return chunk_gla

    def chunk_simple_gla(q, k, v, scale, initial_state, output_final_state, g=None, g_gamma=None):
        if g is None:
            g = g_gamma.view(1, 1, -1).expand(q.shape[:3])
        return naive_recurrent_simple_gla(q, k, v, g, scale, initial_state, output_final_state)
    return chunk_simple_gla


def check_scan_mapping():
    called = []

    def fake(name):
        called.append(name)
        return fla_reference(name)

    fla_backend._fla = fake
    call = lambda fn: (lambda **kw: fn(scale=0.6, return_final_state=True, **kw))  # noqa: E731
    for per_dim, want in ((True, "chunk_gla"), (False, "chunk_simple_gla")):
        inp = inputs(37, per_dim)
        ref, got = fwd_bwd(call(gla_recurrent), inp), fwd_bwd(call(fla_backend.gla_scan), inp)
        assert called[-1] == want, (per_dim, called)
        for key in ref:
            assert_close(got[key], ref[key], 1e-5, f"{want} {key}")
    # retention's constant per-head decay (expanded, no grad): g_gamma
    inp = inputs(37, False)
    inp["g"] = F.logsigmoid(torch.randn(2) + 3).view(1, 1, 2, 1).expand(2, 37, 2, 1)
    name, kw = fla_backend.prepare_gla_scan(**inp, scale=0.6, device_checks=False)
    assert name == "chunk_simple_gla" and "g_gamma" in kw and kw["g_gamma"].shape == (2,)
    leaves = {k: v.clone().requires_grad_(k != "g") for k, v in inp.items()}
    o, s = fla_backend.gla_scan(**leaves, scale=0.6, return_final_state=True)
    ro, rs = gla_recurrent(**inp, scale=0.6, return_final_state=True)
    assert_close(o, ro, 1e-5, "g_gamma o")
    assert_close(s, rs, 1e-5, "g_gamma state")
    (o.sum() + s.sum()).backward()
    assert all(leaves[k].grad is not None for k in ("q", "k", "v", "initial_state"))


def main():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    check_decode_steps()
    check_scan_mapping()
    print("ok")


if __name__ == "__main__":
    main()
