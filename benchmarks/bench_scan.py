"""CPU benchmark of the Mamba-1 selective scan: forward and forward+backward.

Compares, in one run and on identical inputs (u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L);
D, delta_bias: (D,); softplus on, z gating on):
  cpu          our fast path (C++ core, what dispatch picks on CPU)
  torch        our pure-PyTorch chunked fallback
  naive        our sequential reference (kernels/src/selective/naive.py)
  hf-mixer     the scan MambaMixer runs without mamba-ssm: transformers'
               modeling_mamba.mamba_selective_scan (called directly; in transformers 5.24 the
               mixer has no `slow_forward`, this function *is* its torch path)
Every implementation's output is checked against `cpu` before it is timed.

The HF scan's backward indexes a (B, D, L, N) tensor once per step, so its cost grows ~L^2; at
L = 2048 forward+backward takes far over the 10-minute budget, so its forward+backward is timed
at --hf-bwd-len (default 512) next to our fast path at the same size, and the ratio is printed
for that size only.

    python benchmarks/bench_scan.py            # B 2, D 1536, L 2048, N 16 (~4 min on 2 cores)
    python benchmarks/bench_scan.py --quick    # B 1, D 256, L 512, N 16 (~30 s)
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from megaxatl.kernels import dispatch
from megaxatl.kernels.selective import chunked, cpu, naive


def hf_scan():
    from transformers.models.mamba import modeling_mamba

    def run(u, delta, A, B, C, D, z, delta_bias):
        return modeling_mamba.mamba_selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                                   delta_softplus=True)
    return run


def ours(module):
    def run(u, delta, A, B, C, D, z, delta_bias):
        return module.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True)
    return run


def make_inputs(b, d, L, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)  # S4D-real init, as in Mamba
    return dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) * 0.5 - 3.0, A=A,
                B=torch.randn(b, n, L, generator=g), C=torch.randn(b, n, L, generator=g),
                D=torch.ones(d), z=torch.randn(b, d, L, generator=g), delta_bias=torch.randn(d, generator=g) * 0.5)


def time_fwd(fn, inp, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        with torch.no_grad():
            fn(**inp)
        best = min(best, time.perf_counter() - t)
    return best


def time_fwd_bwd(fn, inp, repeat):
    best = float("inf")
    for _ in range(repeat):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
        t = time.perf_counter()
        fn(**leaves).sum().backward()
        best = min(best, time.perf_counter() - t)
    return best


def check(fn, ref_fn, inp, name):
    with torch.no_grad():
        y, r = fn(**inp), ref_fn(**inp)
    err = float((y - r).norm() / r.norm())
    assert err < 1e-4, f"{name} disagrees with the fast path: rel RMS {err:.2e}"
    return err


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (B 1, D 256, L 512)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats for our fast paths (best is kept)")
    ap.add_argument("--hf-bwd-len", type=int, default=512, help="L for hf-mixer forward+backward")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    b, d, L, n = (1, 256, 512, 16) if args.quick else (2, 1536, 2048, 16)
    hf_L = min(args.hf_bwd_len, L)

    print(f"# selective scan, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load avg {os.getloadavg()[0]:.2f}")
    print(f"# dispatch picks: {dispatch.backend_for('selective_scan', 'cpu')}; C++ core available: {cpu.available()}")
    print(f"# size B={b} D={d} L={L} N={n}; best of {args.repeat} for cpu/torch, 1 run for naive/hf-mixer")
    impls = {"cpu": ours(cpu), "torch": ours(chunked), "naive": ours(naive)}
    if not args.skip_hf:
        impls["hf-mixer"] = hf_scan()
    inp = make_inputs(b, d, L, n)
    ref = impls["cpu"]
    for name, fn in impls.items():
        if name != "cpu":
            check(fn, ref, inp, name)

    rows = []
    fast_fwd = time_fwd(ref, inp, args.repeat)
    fast_fb = time_fwd_bwd(ref, inp, args.repeat)
    rows.append(("cpu", L, fast_fwd, fast_fb))
    for name in ("torch", "naive"):
        rep = args.repeat if name == "torch" else 1
        rows.append((name, L, time_fwd(impls[name], inp, rep), time_fwd_bwd(impls[name], inp, rep)))
    if "hf-mixer" in impls:
        rows.append(("hf-mixer", L, time_fwd(impls["hf-mixer"], inp, 1), None))
        if hf_L != L:
            small = make_inputs(b, d, hf_L, n)
            rows.append(("cpu", hf_L, time_fwd(ref, small, args.repeat), time_fwd_bwd(ref, small, args.repeat)))
            rows.append(("hf-mixer", hf_L, None, time_fwd_bwd(impls["hf-mixer"], small, 1)))
        else:
            rows[-1] = ("hf-mixer", L, rows[-1][2], time_fwd_bwd(impls["hf-mixer"], inp, 1))

    base = {Lr: (f, fb) for name, Lr, f, fb in rows if name == "cpu"}
    print(f"{'impl':<10} {'L':>5} {'fwd s':>9} {'fwd+bwd s':>10} {'fwd x cpu':>10} {'f+b x cpu':>10}")
    for name, Lr, f, fb in rows:
        bf, bfb = base[Lr]
        cell = lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9}"  # noqa: E731
        ratio = lambda v, r: f"{v / r:9.1f}x" if v is not None and r else f"{'-':>10}"  # noqa: E731
        print(f"{name:<10} {Lr:>5} {cell(f)} {cell(fb):>10} {ratio(f, bf)} {ratio(fb, bfb)}")


if __name__ == "__main__":
    main()
