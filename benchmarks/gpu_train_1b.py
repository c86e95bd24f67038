"""Training section of the prepared GPU check: a few bf16 steps of a ~1B hybrid through the real
trainer (launchers/pretrain.py, one process), with the measured MFU and peak memory printed beside
`megaxatl plan`'s estimates for the same layout.

    python benchmarks/gpu_train_1b.py --config configs/mamba_1.4b_hybrid.json --data SHARDS --out RUN \
        --steps 20 --seq-len 2048 --micro-batch 4 --results OUT/results.jsonl
    python benchmarks/gpu_train_1b.py --smoke --data SHARDS ...     # CPU: tiny_hybrid, a few steps

It runs in this process so that torch.cuda.max_memory_allocated covers the whole run and the
kernel dispatcher's counters (megaxatl.kernels.used) say which backend ran every op. MFU is the
trainer's own (train/metrics.py: FLOPs per token x tokens/s / peak), from the last logged window
(the first holds Triton's compilation). The planner assumes an MFU (--mfu, 0.4): its step time is
a consequence of that assumption, its memory estimate is the number to compare. No checkpoint
DeepSpeed files are written (train.save_deepspeed_state off); the trainer still saves its final
weights and AdamW moments and exports the weights, which the timing excludes. The result row is
written when the last step's metrics are logged, before that save, so a save that outlives the
section's timeout cannot lose the numbers (a trainer that then fails adds a FAIL row).
"""

from __future__ import annotations

import argparse
import json
import math
import runpy
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _row(results: str | None, **row) -> None:
    print("[train] " + json.dumps(row), flush=True)
    if results:
        with open(results, "a") as f:
            f.write(json.dumps({"section": "train", **row}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mamba_1.4b_hybrid.json")
    p.add_argument("--data", required=True, help="prepared shards (megaxatl prepare-data output)")
    p.add_argument("--out", required=True, help="run folder (must not exist)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB for the planner (default: the device's)")
    p.add_argument("--smoke", action="store_true", help="tiny_hybrid on CPU")
    p.add_argument("--results", help="append JSON rows here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    import torch

    from megaxatl.cluster.plan import GiB, plan
    from megaxatl.train.overrides import load_with_overrides

    if args.smoke:
        args.config, args.seq_len, args.micro_batch = "configs/tiny_hybrid.json", 64, 2
        args.overrides = ["model.vocab_size=512"] + args.overrides
    cuda = torch.cuda.is_available()
    case = f"{Path(args.config).stem} {args.steps} steps b{args.micro_batch} s{args.seq_len}"
    try:
        import deepspeed

        engine = f"deepspeed {deepspeed.__version__}"
    except Exception as e:  # the trainer needs it: report, do not pretend
        _row(args.results, case=case, backend="-", dtype="bf16", status="NOT CHECKED",
             note=f"DeepSpeed does not import: {type(e).__name__}: {str(e)[:160]}")
        return 0
    overrides = [f"data.train_shards={args.data}", f"data.val_shards={args.data}", f"data.seq_len={args.seq_len}",
                 f"data.micro_batch_size={args.micro_batch}", f"train.steps={args.steps}", "train.dtype=bf16",
                 f"train.out_dir={args.out}", "train.warmup_steps=5", f"train.eval_interval={10 * args.steps}",
                 "train.eval_steps=1", f"train.save_interval={10 * args.steps}", "train.save_deepspeed_state=false",
                 "logging.log_interval=5", "logging.progress=false", "logging.wandb_mode=disabled",
                 "transfer.donor=null"] + args.overrides
    try:
        cfg = load_with_overrides(ROOT / args.config, overrides)
    except Exception as e:
        _row(args.results, case=case, backend="-", dtype="bf16", status="FAIL", note=f"config: {e}")
        return 1
    gpu_mem = args.gpu_mem or (torch.cuda.get_device_properties(0).total_memory / GiB if cuda else 139.0)
    fits, rows = plan(cfg, 1, gpu_mem, args.seq_len, args.micro_batch, zero_stages=(cfg.parallel.zero_stage,))
    est = next((r for r in rows if r.tp == 1 and r.pp == 1 and r.ckpt == cfg.parallel.activation_checkpointing), None)
    print(f"planner (1 GPU, {gpu_mem:.0f} GiB, ZeRO {cfg.parallel.zero_stage}): "
          + (f"{est.params / 1e6:.0f}M params, {est.total / GiB:.1f} GiB total ({est.acts / GiB:.1f} GiB activations), "
             f"step {est.step_s:.3f} s at the assumed MFU 0.4" if est else "no matching layout"), flush=True)

    from megaxatl import kernels
    from megaxatl.train import metrics as train_metrics

    state = {"emitted": False}
    log_train = train_metrics.Metrics.train

    def observed(self, step, total_steps, **values):  # observation only: the record is the trainer's
        out = log_train(self, step, total_steps, **values)
        if step == total_steps and not state["emitted"]:
            state["emitted"] = True
            emit(time.time() - t0)
        return out

    def emit(wall):
        peak = torch.cuda.max_memory_allocated() / GiB if cuda else None
        metrics = Path(args.out) / "metrics.jsonl"
        records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
        train = [r for r in records if r.get("kind") == "train"]
        if not train:
            _row(args.results, case=case, backend=engine, dtype="bf16", status="FAIL", note="no train records")
            return
        last = train[-1]
        note = (f"{engine}; loss {train[0]['loss']:.3f} -> {last['loss']:.3f}; {last['tokens_per_s']:.0f} tok/s, "
                f"{last['tflops']:.1f} TFLOP/s" + (f", MFU {last['mfu']:.1%}" if "mfu" in last else ", MFU n/a (no peak)")
                + (f"; peak mem {peak:.1f} GiB vs planner {est.total / GiB:.1f} GiB" if peak is not None and est else "")
                + f"; {wall:.0f} s to the last step")
        ok = all(math.isfinite(r["loss"]) for r in train) and last["step"] == args.steps
        _row(args.results, case=case, backend=engine, dtype="bf16", status="PASS" if ok else "FAIL", note=note,
             mfu=last.get("mfu"), tflops=last["tflops"], tokens_per_s=last["tokens_per_s"], peak_mem_gib=peak,
             plan_mem_gib=est.total / GiB if est else None, plan_acts_gib=est.acts / GiB if est else None,
             kernels=kernels.used(), losses=[r["loss"] for r in train])
        state["ok"] = ok

    train_metrics.Metrics.train = observed
    argv_before = sys.argv
    sys.argv = ["pretrain.py", "--config", str(ROOT / args.config)] + [a for o in overrides for a in ("--set", o)]
    t0 = time.time()
    rc = None
    try:
        runpy.run_path(str(ROOT / "launchers" / "pretrain.py"), run_name="__main__")
    except SystemExit as e:
        rc = e.code
    except Exception as e:
        traceback.print_exc()
        rc = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        sys.argv = argv_before
    if rc not in (0, None) or not state["emitted"]:
        _row(args.results, case=case + " (trainer exit)", backend=engine, dtype="bf16", status="FAIL",
             note=f"trainer exit {rc} after {time.time() - t0:.0f} s" + ("" if state["emitted"] else ", before the last step"))
        return 1
    ok = state.get("ok", False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
