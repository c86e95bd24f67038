"""Run by tests/test_gla.py::test_triton_gla_under_interpreter in a fresh process with
TRITON_INTERPRET=1 (the interpreter must be on before triton is first imported)."""

import os

import torch
import torch.nn.functional as F

from helpers import assert_close
from megaxatl.kernels import dispatch
from megaxatl.kernels.gla.naive import gla_recurrent
from megaxatl.kernels.testing import fwd_bwd


def main():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    triton_fn = dispatch.load("gla_scan", "triton")
    assert dispatch.backend_for("gla_scan", torch.zeros(1)) == "cpu"  # never chosen automatically on CPU
    for L, per_dim, h0 in ((20, True, True), (16, False, False), (5, True, False)):
        H, K, V = 2, 5, 3
        inputs = dict(q=torch.randn(1, L, H, K), k=torch.randn(1, L, H, K), v=torch.randn(1, L, H, V),
                      g=F.logsigmoid(torch.randn(1, L, H, K if per_dim else 1) + 2.0))
        if h0:
            inputs["initial_state"] = torch.randn(1, H, K, V)
        call = lambda fn: (lambda **kw: fn(scale=0.6, chunk_size=16, return_final_state=True, **kw))  # noqa: E731
        ref, got = fwd_bwd(call(gla_recurrent), inputs), fwd_bwd(call(triton_fn), inputs)
        for key in ref:
            assert_close(got[key], ref[key], 1e-5, f"triton L={L} per_dim={per_dim} {key}")
    print("ok")


if __name__ == "__main__":
    main()
