"""One prepared GPU check: every Triton op against its reference on the device, then timings at
paper scale with achieved memory bandwidth next to a measured device-to-device copy.

    bash benchmarks/gpu_check.sh                 # on a machine with one CUDA GPU (< 8 minutes)
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke   # CPU: tiny sizes, proves the script runs

Correctness compares the Triton backend with `naive` (the sequential reference) on the same device:
output, final state and every input gradient, as relative RMS error. Timing runs the Triton backend,
the pure-PyTorch `torch` backend and, when installed, mamba-ssm / causal-conv1d (`cuda`), at the
paper's 2.8B-scale shapes (d_inner 5120, L 2048, batch 8, bf16 inputs). Bandwidth counts the bytes
an ideal kernel must move (inputs read once, outputs written once); the copy line is the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from megaxatl.kernels import dispatch, testing


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fwd_bwd(fn, inputs: dict, device) -> dict:
    leaves = {k: (v.detach().to(device).clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    y, state = fn(**leaves)
    g = torch.Generator(device="cpu").manual_seed(0)
    loss = (y.float() * torch.randn(y.shape, generator=g).to(device)).sum()
    loss = loss + (state.float() * torch.randn(state.shape, generator=g).to(device)).sum()
    loss.backward()
    out = {"y": y, "state": state}
    out.update({f"d{k}": v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.grad is not None})
    return out


OPS = {
    # op: (inputs at check size, call(impl) -> fn(**inputs) returning (y, state))
    "selective_scan": (lambda s: testing.scan_inputs(bsz=2, d=64 if s else 256, L=63 if s else 500, n=16),
                       lambda impl: lambda **kw: impl(**kw, return_last_state=True)),
    "ssd_scan": (lambda s: testing.ssd_inputs(bsz=2, L=63 if s else 500, heads=4, headdim=16, groups=2, n=16),
                 lambda impl: lambda **kw: impl(**kw, chunk_size=32, return_final_states=True)),
    "causal_conv1d": (lambda s: testing.conv_inputs(bsz=2, d=64 if s else 512, L=63 if s else 500, k=4),
                      lambda impl: lambda **kw: impl(**kw, activation="silu", return_final_state=True)),
}


def check_correctness(device, smoke: bool) -> list[dict]:
    rows = []
    for op, (make, wrap) in OPS.items():
        torch.manual_seed(0)
        inputs = make(smoke)
        try:
            got = fwd_bwd(wrap(dispatch.load(op, "triton")), inputs, device)
            ref = fwd_bwd(wrap(dispatch.load(op, "naive")), inputs, device)
            worst = max(rel_rms(got[k], ref[k]) for k in ref)
            rows.append({"op": op, "max_rel_rms": worst, "ok": worst < 1e-4, "checked": sorted(ref)})
        except Exception as e:  # report every op, never stop at the first failure
            rows.append({"op": op, "error": f"{type(e).__name__}: {e}", "ok": False})
    return rows


def timeit(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timeit(lambda: dst.copy_(src), device, repeats)


def scan_timings(device, smoke: bool, repeats: int) -> list[dict]:
    bsz, d, L, n = (1, 64, 128, 16) if smoke else (8, 5120, 2048, 16)
    dtype = torch.float32 if smoke else torch.bfloat16
    inp = testing.scan_inputs(bsz=bsz, d=d, L=L, n=n, groups=None, h0=False, dtype=dtype)
    inp = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    elt = inp["u"].element_size()
    # ideal traffic: read u, delta, z, B, C; write y (A, D, bias are tiny)
    fwd_bytes = (4 * bsz * d * L + 2 * bsz * n * L) * elt
    backends = ["triton", "torch"] + (["cuda"] if _available("selective_scan", "cuda", device) else [])
    rows = []
    for name in backends:
        impl = dispatch.load("selective_scan", name)
        f = lambda: impl(**inp)  # noqa: E731
        t_fwd = timeit(f, device, repeats)
        leaves = {k: (v.detach().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v)
                  for k, v in inp.items()}

        def fb():
            for v in leaves.values():
                if isinstance(v, torch.Tensor):
                    v.grad = None
            impl(**leaves).float().sum().backward()

        t_fb = timeit(fb, device, repeats)
        rows.append({"backend": name, "shape": [bsz, d, L, n], "dtype": str(dtype), "fwd_s": t_fwd, "fwd_bwd_s": t_fb,
                     "fwd_GBps": fwd_bytes / t_fwd / 1e9})
    return rows


def _available(op: str, name: str, device) -> bool:
    return dispatch._backends(op)[name].available(device.type)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes; on CPU needs TRITON_INTERPRET=1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check: no CUDA device; run with TRITON_INTERPRET=1 --smoke to exercise the script on CPU",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"gpu_check on {name}, torch {torch.__version__}")
    correctness = check_correctness(device, args.smoke)
    for r in correctness:
        print(f"  {r['op']:<16} " + (f"ERROR {r['error']}" if "error" in r else
                                     f"max rel RMS {r['max_rel_rms']:.2e} {'ok' if r['ok'] else 'FAIL'}"))
    copy_bw = copy_bandwidth(device, (1 << 20) if args.smoke else (1 << 30), args.repeats)
    print(f"  device copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    timings = scan_timings(device, args.smoke, 1 if args.smoke else args.repeats)
    for r in timings:
        print(f"  selective_scan {r['backend']:<7} {tuple(r['shape'])} fwd {r['fwd_s'] * 1e3:.2f} ms "
              f"({r['fwd_GBps']:.1f} GB/s = {r['fwd_GBps'] * 1e9 / copy_bw:.0%} of copy), fwd+bwd {r['fwd_bwd_s'] * 1e3:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "correctness": correctness, "copy_GBps": copy_bw / 1e9,
                                               "selective_scan": timings}, indent=2))
    return 0 if all(r["ok"] for r in correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
