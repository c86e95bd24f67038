"""Kernel sections of the prepared GPU check (benchmarks/gpu_check.sh runs them):

    correctness  every backend automatic dispatch can pick on CUDA (`cuda`: mamba-ssm, causal-conv1d,
                 flash-linear-attention where they load; `triton`: ours) against `naive`, at the
                 trainer's shapes, fp32 and bf16, forward and backward (every input gradient)
    stride       causal-conv1d on the channel-last views Mamba-2's in_proj slice gives at TP 1/2/4/8
    inner        mamba-ssm's fused mamba_inner_fn against our composed Mamba-1 path
    bandwidth    selective_scan forward at paper scale, GB/s as a fraction of a measured device copy

    python benchmarks/gpu_check.py --group triton --results OUT/results.jsonl   # on the GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke --group triton ...  # CPU, tiny shapes

Each case appends one JSON row to --results: section, case, backend, dtype, status (PASS / FAIL /
NOT CHECKED), max_abs (largest |backend - naive| over every output and gradient), rel_rms (the
worst tensor's relative RMS error), tol (the rel_rms bound), note. The reference runs in fp32 on
the same (rounded) inputs; a backend that cannot load here is NOT CHECKED with the reason, never
PASS. Tolerances: fp32 3e-3 (Triton's tl.dot may use TF32), bf16 3e-2 (16-bit inputs and outputs,
fp32 states); a wrong kernel shows rel_rms near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from megaxatl.kernels import dispatch, testing

TOL = {torch.float32: 3e-3, torch.bfloat16: 3e-2}
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Results:
    def __init__(self, path: str | None):
        self.path, self.rows = path, []

    def add(self, **row) -> None:
        row = {k: v for k, v in row.items() if v is not None}
        self.rows.append(row)
        num = (f" max_abs {row['max_abs']:.3g} rel_rms {row['rel_rms']:.3g} / tol {row['tol']:g}"
               if "rel_rms" in row else "")
        print(f"[{row['section']}] {row['case']:<34} {row.get('backend', '-'):<7} {row.get('dtype', '-'):<5} "
              f"{row['status']}{num} {row.get('note', '')}", flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(call, inputs: dict, device, ref: bool) -> dict:
    """call(**inputs) -> (y, state or None) on fresh leaves (fp32 copies for the reference), then the
    gradient of a fixed random projection of y and state w.r.t. every floating input."""
    leaves = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().to(device)
            if ref and v.is_floating_point():
                v = v.float()
            v = v.clone().requires_grad_(v.is_floating_point())
        leaves[k] = v
    y, state = call(**leaves)
    g = torch.Generator(device="cpu").manual_seed(0)
    loss = (y.float() * torch.randn(y.shape, generator=g).to(device)).sum()
    if state is not None:
        loss = loss + (state.float() * torch.randn(state.shape, generator=g).to(device)).sum()
    loss.backward()
    out = {"y": y.detach()} | ({} if state is None else {"state": state.detach()})
    out |= {f"d{k}": v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.grad is not None}
    return out


def compare(got: dict, ref: dict) -> tuple[float, float, str]:
    """(max abs error, worst relative RMS, name of the worst tensor) over the reference's tensors."""
    worst, worst_name, max_abs = 0.0, "", 0.0
    for k, r in ref.items():
        if k not in got:
            raise AssertionError(f"backend gave no {k}")
        a, b = got[k].double(), r.double()
        max_abs = max(max_abs, float((a - b).abs().max()))
        rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
        if rel > worst or not rel == rel:
            worst, worst_name = rel, k
    return max_abs, worst, worst_name


def shapes(smoke: bool) -> dict:
    """Trainer shapes: Mamba-1 d_inner 2560 (configs/mamba_1.4b*: d_model 2048, expand 1.25),
    Mamba-2 heads of 64 with d_state 128, retention / GLA head_dim 256, sequence 2048, micro-batch 2."""
    if smoke:
        return dict(bsz=1, L=32, d=16, n=4, heads=2, headdim=8, groups=1, ssd_n=8, chunk=16,
                    gla_heads=2, gla_k=8, gla_v=8, gla_L=32)
    return dict(bsz=2, L=2048, d=2560, n=16, heads=32, headdim=64, groups=1, ssd_n=128, chunk=256,
                gla_heads=8, gla_k=256, gla_v=256, gla_L=1024)


def cases(s: dict, dtype) -> list[tuple]:
    """(op, case name, inputs, call(impl) -> fn(**inputs) -> (y, state))."""
    gla = lambda g_dim: dict(  # noqa: E731
        q=torch.randn(s["bsz"], s["gla_L"], s["gla_heads"], s["gla_k"], dtype=dtype),
        k=torch.randn(s["bsz"], s["gla_L"], s["gla_heads"], s["gla_k"], dtype=dtype) / s["gla_k"] ** 0.5,
        v=torch.randn(s["bsz"], s["gla_L"], s["gla_heads"], s["gla_v"], dtype=dtype),
        g=torch.nn.functional.logsigmoid(torch.randn(s["bsz"], s["gla_L"], s["gla_heads"], g_dim) + 3))
    return [
        ("selective_scan", "selective_scan (Mamba-1)",
         testing.scan_inputs(bsz=s["bsz"], d=s["d"], L=s["L"], n=s["n"], groups=None, h0=False, dtype=dtype),
         lambda impl: lambda **kw: impl(**kw, return_last_state=True)),
        ("ssd_scan", "ssd_scan (Mamba-2)",
         testing.ssd_inputs(bsz=s["bsz"], L=s["L"], heads=s["heads"], headdim=s["headdim"], groups=s["groups"],
                            n=s["ssd_n"], D="h", h0=False, dtype=dtype),
         lambda impl: lambda **kw: impl(**kw, chunk_size=s["chunk"], return_final_states=True)),
        ("causal_conv1d", "causal_conv1d (silu, k 4)",
         testing.conv_inputs(bsz=s["bsz"], d=s["d"], L=s["L"], k=4, h0=False, dtype=dtype),
         lambda impl: lambda **kw: (impl(**kw, activation="silu"), None)),
        ("gla_scan", "gla_scan (GLA, per-key gate)", gla(s["gla_k"]),
         lambda impl: lambda **kw: impl(**kw, return_final_state=True)),
        ("gla_scan", "gla_scan (retention-like per-head)", gla(1),
         lambda impl: lambda **kw: impl(**kw, return_final_state=True)),
    ]


def _cannot(op: str, backend: str, device) -> str | None:
    b = dispatch._backends(op).get(backend)
    if b is None:
        return f"{op} has no {backend} backend"
    return b.problem(device.type)


def check_correctness(res: Results, group: str, device, smoke: bool) -> None:
    s = shapes(smoke)
    for dname, dtype in DT.items():
        for op, name, inputs, wrap in cases(s, dtype):
            backend = group
            why = _cannot(op, backend, device)
            if why is not None:
                res.add(section="correctness", case=name, backend=backend, dtype=dname, status="NOT CHECKED", note=why)
                continue
            if not dispatch._backends(op)[backend].auto:
                continue  # a reference path (our Triton GLA): automatic dispatch never picks it
            try:
                torch.manual_seed(0)
                got = fwd_bwd(wrap(dispatch.load(op, backend)), inputs, device, ref=False)
                ref = fwd_bwd(wrap(dispatch.load(op, "naive")), inputs, device, ref=True)
                max_abs, rel, worst = compare(got, ref)
                res.add(section="correctness", case=name, backend=backend, dtype=dname, max_abs=max_abs, rel_rms=rel,
                        tol=TOL[dtype], status="PASS" if rel <= TOL[dtype] else "FAIL", note=f"worst: {worst}")
            except Exception as e:  # report every case, never stop at the first failure
                traceback.print_exc()
                res.add(section="correctness", case=name, backend=backend, dtype=dname, status="FAIL",
                        note=f"{type(e).__name__}: {str(e)[:200]}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# (local in_proj width 2 d_inner + 2 G N + H, where xBC starts (d_inner), xBC width d_inner + 2 G N)
# of the shipped Mamba-2 mixers: mamba2_smollm2_135m_hybrid (d_inner 576, G 1, N 64, H 9) at TP 1,
# tiny_hybrid (d_inner 128, G 2, N 16, H 8; one group per rank past TP 2) at TP 1 / 2 / 4 / 8
STRIDE_CASES = {"smollm2_135m TP1": (1289, 576, 704), "tiny TP1": (328, 128, 192), "tiny TP2": (164, 64, 96),
                "tiny TP4": (98, 32, 64), "tiny TP8": (65, 16, 48)}


def check_stride(res: Results, device, smoke: bool) -> None:
    """causal_conv1d's `cuda` backend on a channel-last slice of a wider row (what models/mamba2.py
    hands it) against naive; a layout causal-conv1d would reject must still come back right."""
    why = _cannot("causal_conv1d", "cuda", device)
    L = 64 if smoke else 2048
    for name, (width, start, dim) in STRIDE_CASES.items():
        if why is not None:
            res.add(section="stride", case=f"conv channel-last {name}", backend="cuda", dtype="bf16",
                    status="NOT CHECKED", note=why)
            continue
        try:
            zx0 = torch.randn(2, L, width, dtype=torch.bfloat16, device=device)
            w = torch.randn(dim, 4, device=device) / 2
            b = torch.randn(dim, device=device)
            gy = torch.randn(2, dim, L, device=device)

            def run(backend, dtype):  # forward and backward through the (B, dim, L) view, stride(2) == width
                zx = zx0.detach().to(dtype).clone().requires_grad_()
                x = zx[..., start:start + dim].transpose(1, 2)
                y = dispatch.load("causal_conv1d", backend)(x, w, b, activation="silu")
                (y.float() * gy).sum().backward()
                return {"y": y.detach(), "dzx": zx.grad}, x

            got, x = run("cuda", torch.bfloat16)
            ref, _ = run("naive", torch.float32)
            max_abs, rel, _ = compare(got, ref)
            res.add(section="stride", case=f"conv channel-last {name}", backend="cuda", dtype="bf16", max_abs=max_abs,
                    rel_rms=rel, tol=TOL[torch.bfloat16], status="PASS" if rel <= TOL[torch.bfloat16] else "FAIL",
                    note=f"x strides {x.stride()}")
        except Exception as e:
            traceback.print_exc()
            res.add(section="stride", case=f"conv channel-last {name}", backend="cuda", dtype="bf16", status="FAIL",
                    note=f"{type(e).__name__}: {str(e)[:200]}")


def check_inner(res: Results, device, smoke: bool) -> None:
    """mamba_inner's `cuda` (mamba-ssm's fused mamba_inner_fn) against `torch` (our composed path
    through the dispatched conv and scan), forward and every gradient, bf16 and fp32."""
    why = _cannot("mamba_inner", "cuda", device)
    d, n, r, dm, L = (16, 4, 2, 8, 32) if smoke else (2560, 16, 128, 2048, 2048)
    for dname, dtype in DT.items():
        if why is not None:
            res.add(section="inner", case="mamba_inner vs composed", backend="cuda", dtype=dname, status="NOT CHECKED",
                    note=why)
            continue
        try:
            torch.manual_seed(0)
            inputs = dict(xz=torch.randn(2, 2 * d, L, dtype=dtype), conv_weight=torch.randn(d, 4, dtype=dtype) / 2,
                          conv_bias=torch.randn(d, dtype=dtype), x_proj_weight=torch.randn(r + 2 * n, d, dtype=dtype) / d ** 0.5,
                          dt_proj_weight=torch.randn(d, r, dtype=dtype) / r ** 0.5,
                          out_proj_weight=torch.randn(dm, d, dtype=dtype) / d ** 0.5, out_proj_bias=None,
                          A=-(0.5 + 4 * torch.rand(d, n)), D=torch.randn(d), delta_bias=0.5 * torch.randn(d) - 2)
            wrap = lambda impl: lambda **kw: (impl(**kw), None)  # noqa: E731
            got = fwd_bwd(wrap(dispatch.load("mamba_inner", "cuda")), inputs, device, ref=False)
            ref = fwd_bwd(wrap(dispatch.load("mamba_inner", "torch")), inputs, device, ref=True)
            max_abs, rel, worst = compare(got, ref)
            res.add(section="inner", case="mamba_inner vs composed", backend="cuda", dtype=dname, max_abs=max_abs,
                    rel_rms=rel, tol=TOL[dtype], status="PASS" if rel <= TOL[dtype] else "FAIL", note=f"worst: {worst}")
        except Exception as e:
            traceback.print_exc()
            res.add(section="inner", case="mamba_inner vs composed", backend="cuda", dtype=dname, status="FAIL",
                    note=f"{type(e).__name__}: {str(e)[:200]}")


def timeit(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def check_bandwidth(res: Results, backends: list[str], device, smoke: bool, repeats: int) -> None:
    """selective_scan forward at the paper's 2.8B scale (d_inner 5120, L 2048, batch 8, N 16,
    bf16): the bytes an ideal kernel moves (u, delta, z, B, C read once, y written once) per
    second, next to a device-to-device copy of 1 GiB measured here (the ceiling)."""
    nbytes = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy = 2 * nbytes / timeit(lambda: dst.copy_(src), device, repeats)
    res.add(section="bandwidth", case="device copy", backend="-", dtype="bf16", status="MEASURED",
            note=f"{copy / 1e9:.1f} GB/s", gbps=copy / 1e9)
    del src, dst
    bsz, d, L, n = (1, 16, 32, 4) if smoke else (8, 5120, 2048, 16)
    dtype = torch.float32 if smoke else torch.bfloat16
    inp = testing.scan_inputs(bsz=bsz, d=d, L=L, n=n, groups=None, h0=False, dtype=dtype)
    inp = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    ideal = (4 * bsz * d * L + 2 * bsz * n * L) * inp["u"].element_size()
    for name in backends:
        why = _cannot("selective_scan", name, device)
        if why is not None:
            res.add(section="bandwidth", case=f"selective_scan fwd {bsz}x{d}x{L}", backend=name, dtype="bf16",
                    status="NOT CHECKED", note=why)
            continue
        try:
            impl = dispatch.load("selective_scan", name)
            t = timeit(lambda: impl(**inp), device, repeats)
            gbps = ideal / t / 1e9
            res.add(section="bandwidth", case=f"selective_scan fwd {bsz}x{d}x{L}", backend=name, dtype=str(dtype)[6:],
                    status="MEASURED", note=f"{t * 1e3:.2f} ms, {gbps:.1f} GB/s = {gbps * 1e9 / copy:.1%} of copy",
                    ms=t * 1e3, gbps=gbps, ratio_to_copy=gbps * 1e9 / copy)
        except Exception as e:
            traceback.print_exc()
            res.add(section="bandwidth", case=f"selective_scan fwd {bsz}x{d}x{L}", backend=name, dtype="bf16",
                    status="FAIL", note=f"{type(e).__name__}: {str(e)[:200]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", choices=("triton", "cuda"), required=True,
                   help="triton: our Triton kernels; cuda: the external libraries (after their builds)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU needs TRITON_INTERPRET=1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--results", help="append one JSON row per case here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("gpu_check: no CUDA device (use --smoke with TRITON_INTERPRET=1 to run the script on CPU)", file=sys.stderr)
        Results(args.results).add(section=args.group, case="(section)", status="FAIL", note="no CUDA device")
        return 2
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"gpu_check --group {args.group} on {name}, torch {torch.__version__}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}", flush=True)
    res = Results(args.results)
    repeats = 1 if args.smoke else args.repeats
    if args.group == "cuda":
        # the compiled kernels first: mamba-ssm's and fla's Triton kernels autotune on first use
        # (tens of seconds), and a section timeout must not cost the stride and inner cases
        check_stride(res, device, args.smoke)
        check_inner(res, device, args.smoke)
        check_bandwidth(res, ["cuda"], device, args.smoke, repeats)
        check_correctness(res, args.group, device, args.smoke)
    else:
        check_correctness(res, args.group, device, args.smoke)
        check_bandwidth(res, ["triton", "torch"], device, args.smoke, repeats)
    return 1 if any(r["status"] == "FAIL" for r in res.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
