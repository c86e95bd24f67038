"""CPU benchmark of the causal depthwise conv1d (x: (B, D, L), weight: (D, k), silu): forward and
forward+backward of our fast path (F.conv1d on left-padded input) vs the sequential reference,
plus one decode step (causal_conv1d_update), on identical inputs checked to agree.

    python benchmarks/bench_conv.py            # B 2, D 1536, L 2048, k 4
    python benchmarks/bench_conv.py --quick    # B 1, D 256, L 512, k 4
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from megaxatl.kernels import dispatch
from megaxatl.kernels.conv1d import naive, torch_conv


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    b, d, L, k = (1, 256, 512, 4) if args.quick else (2, 1536, 2048, 4)
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(b, d, L, generator=g), torch.randn(d, k, generator=g), torch.randn(d, generator=g)
    print(f"# causal conv1d, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load avg {os.getloadavg()[0]:.2f}; size B={b} D={d} L={L} k={k}; dispatch picks "
          f"{dispatch.backend_for('causal_conv1d', 'cpu')}")
    impls = {"torch": torch_conv.causal_conv1d, "naive": naive.causal_conv1d}
    with torch.no_grad():
        ref = impls["torch"](x, w, bias, "silu")
        err = float((impls["naive"](x, w, bias, "silu") - ref).norm() / ref.norm())
    assert err < 1e-5, err
    print(f"{'impl':<8} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for name, fn in impls.items():
        def fwd():
            with torch.no_grad():
                fn(x, w, bias, "silu")

        def fwd_bwd():
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
            fn(xs, ws, bs, "silu").sum().backward()

        rep = args.repeat if name == "torch" else 1
        print(f"{name:<8} {1e3 * best_of(fwd, rep):9.2f} {1e3 * best_of(fwd_bwd, rep):11.2f}")
    step = dispatch.load("causal_conv1d_update", dispatch.backend_for("causal_conv1d_update", "cpu"))
    state = torch.randn(b, d, k - 1, generator=g)
    per_step = best_of(lambda: step(x[..., 0], state, w, bias, "silu"), 50)
    print(f"decode step (causal_conv1d_update): {1e6 * per_step:.1f} us")


if __name__ == "__main__":
    main()
