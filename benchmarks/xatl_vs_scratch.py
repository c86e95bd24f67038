"""XATL vs training from scratch: the paper's experiment (arXiv 2404.02684) at CPU scale.

Donor: SmolLM2-135M (real weights). Targets: the demo's 4-block model (d_model 576, SwiGLU MLP
1536, tied embeddings, Mamba expand 1.0 so d_inner = the donor's attention width 576) as

* a hybrid Mamba with softmax attention at 0-based block 1 and at the middle block (n_layers // 2),
  i.e. pattern `M**M` (the paper keeps attention at 1 and 11 of 24; with 4 blocks n/2 - 1 would
  collide with block 1, so the middle is block 2);
* a pure Mamba, `MMMM`.

Same data (Brown, tokenized with the donor's tokenizer, the demo's cached shards), same seed, same
optimizer steps and LR schedule for every arm. Arms:

    scratch                 random init
    emb+norm+mlp+oproj      XATL default mode
    emb+norm+mlp            XATL
    emb+norm                XATL
    default+LIT             default mode, transferred weights frozen until the Loss Improvement
                            Threshold fires (window / threshold / patience set so it fires within
                            the run; the step is reported), then a fresh LR warmup on them
    attn-init               default mode + Q->C, K->B, V->x into the Mamba mixers (MambaInLlama)

Per arm: validation loss (nats/token) and bits per byte at every eval step, and the speedup =
steps scratch needs to first reach its own final val loss / steps the arm needs to reach it
(linear interpolation between eval points; "not reached" when it never does).

    .venv/bin/python benchmarks/xatl_vs_scratch.py --quick   # hybrid; scratch, default, emb+norm
    .venv/bin/python benchmarks/xatl_vs_scratch.py           # both targets, full arm sets

Each invocation trains into a fresh runs/xatl-<time>/ folder; the curves (JSON) and the loss plot
(PNG) go to benchmarks/results/ (`xatl_vs_scratch[_quick].{json,png}`) and into that run folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from megaxatl.demo import eval_curve, plot_into, prepare_corpus

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "xatl_vs_scratch_smollm2_4block.json"  # the 4-block cut; the demo runs at full depth

DEFAULT_MODE = "emb+norm+mlp+oproj"
# arm name -> (transfer mode or None for scratch, LIT freeze?)
ARMS = {
    "scratch": (None, False),
    "emb+norm+mlp+oproj": (DEFAULT_MODE, False),
    "emb+norm+mlp": ("emb+norm+mlp", False),
    "emb+norm": ("emb+norm", False),
    "default+LIT": (DEFAULT_MODE, True),
    "attn-init": ("attn-init", False),
}
VARIANTS = {"hybrid": "M**M", "mamba": "MMMM"}

# Full mode, sized from the measured 7.2 s per 8 x 128 step (M**M, fp32, 2 shared cores) plus
# ~1.3 s per 8 x 128 eval batch: 9 arms x (32 steps + 9 evals x 4 batches) ~ 40 min. The pure-Mamba
# variant runs 3 arms (scratch, the default mode, attn-init); the mode ablations are hybrid-only.
FULL = dict(variants={"hybrid": list(ARMS), "mamba": ["scratch", DEFAULT_MODE, "attn-init"]},
            steps=32, eval_interval=4, eval_steps=4)
QUICK = dict(variants={"hybrid": ["scratch", DEFAULT_MODE, "emb+norm"]}, steps=12, eval_interval=3, eval_steps=3)


def first_reach(curve: list[dict], target: float) -> float | None:
    """First (linearly interpolated) step at which the val loss is <= target; None if never."""
    pts = [(r["step"], r["val_loss"]) for r in curve]
    if pts and pts[0][1] <= target:
        return float(pts[0][0])
    for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
        if l1 <= target < l0:
            return s0 + (l0 - target) / (l0 - l1) * (s1 - s0)
    return None


def speedups(curves: dict[str, list[dict]]) -> dict[str, dict]:
    target = curves["scratch"][-1]["val_loss"]
    s_scratch = first_reach(curves["scratch"], target)
    out = {}
    for name, curve in curves.items():
        s = first_reach(curve, target)
        out[name] = {"target_val_loss": target, "steps_to_target": s, "scratch_steps": s_scratch,
                     "speedup": (None if s is None else (math.inf if s == 0 else s_scratch / s))}
    return out


def unfreeze_step(run_dir: Path) -> int | None:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "event" and r.get("event") == "unfreeze":
            return r["step"]
    return None


def mean_step_seconds(run_dir: Path, tokens_per_step: int) -> float | None:
    rates = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rates if r.get("kind") == "train" and r.get("tokens_per_s")]
    rates = rates[1:] or rates  # the first step carries the warm-up
    return tokens_per_step / (sum(rates) / len(rates)) if rates else None


def fmt_speedup(s: dict) -> str:
    if s["speedup"] is None:
        return "not reached"
    if math.isinf(s["speedup"]):
        return "at init"
    return f"{s['speedup']:.2f}x"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="hybrid only, 3 arms, 12 steps (~6 min on 2 shared cores)")
    p.add_argument("--steps", type=int, help="override the steps per arm")
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--variants", help="comma list of hybrid,mamba (default: the mode's)")
    p.add_argument("--arms", help="comma list: keep only these arms (scratch is needed for the speedup)")
    p.add_argument("--tag", help="results go to xatl_vs_scratch_<tag>.{json,png} (keeps the full run's files)")
    p.add_argument("--lit-window", type=int, default=4, help="LIT window (steps)")
    p.add_argument("--lit-threshold", type=float, default=0.08, help="LIT relative-improvement threshold")
    p.add_argument("--lit-patience", type=int, default=1)
    p.add_argument("--lit-warmup", type=int, default=4, help="LR warmup steps of the unfrozen weights")
    p.add_argument("--out", default=str(ROOT / "runs"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    import torch

    from megaxatl.assets.donors import resolve_donor
    from megaxatl.config import load_config
    from megaxatl.train import run
    from megaxatl.transfer import from_donor, write_transfer

    mode = copy.deepcopy(QUICK if args.quick else FULL)
    if args.steps:
        mode["steps"] = args.steps
    if args.eval_interval:
        mode["eval_interval"] = args.eval_interval
    if args.variants:
        mode["variants"] = {v: mode["variants"].get(v, FULL["variants"][v]) for v in args.variants.split(",")}
    if args.arms:
        keep = args.arms.split(",")
        mode["variants"] = {v: [a for a in arms if a in keep] for v, arms in mode["variants"].items()}
    t_start = time.time()
    root = Path(args.out) / time.strftime("xatl-%Y%m%d-%H%M%S")
    root.mkdir(parents=True)
    print(f"[xatl] writing into {root}; {mode}", flush=True)

    base = load_config(CONFIG)
    base.train.steps = mode["steps"]
    base.train.eval_interval = mode["eval_interval"]
    base.train.eval_steps = mode["eval_steps"]
    base.logging.log_interval = 1
    donor_dir = resolve_donor(base.transfer.donor)
    data = prepare_corpus(donor_dir, base.data.seq_len, 12)
    base.data.train_shards = base.data.val_shards = str(data)
    tokens_per_step = base.data.micro_batch_size * base.data.seq_len * base.train.grad_accum

    results = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "platform": platform.platform()},
               "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "run_dir": str(root),
               "settings": {"steps": mode["steps"], "eval_interval": mode["eval_interval"],
                            "eval_steps": mode["eval_steps"], "micro_batch": base.data.micro_batch_size,
                            "seq_len": base.data.seq_len, "lr": base.train.lr, "min_lr": base.train.min_lr,
                            "warmup_steps": base.train.warmup_steps, "seed": base.data.seed,
                            "lit": {"window": args.lit_window, "threshold": args.lit_threshold,
                                    "patience": args.lit_patience, "warmup_steps": args.lit_warmup}},
               "variants": {}}
    json_name = "xatl_vs_scratch_quick" if args.quick else "xatl_vs_scratch"
    if args.tag:
        json_name = f"xatl_vs_scratch_{args.tag}"
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)

    def save():
        text = json.dumps(results, indent=1)
        (root / f"{json_name}.json").write_text(text)
        (results_dir / f"{json_name}.json").write_text(text)

    for variant, arm_names in mode["variants"].items():
        pattern = VARIANTS[variant]
        vdir = root / variant
        cfg = copy.deepcopy(base)
        cfg.model.pattern = pattern
        inits: dict[str, Path] = {}
        vres = results["variants"][variant] = {"pattern": pattern, "arms": {}}
        for name in arm_names:
            tmode, lit = ARMS[name]
            if tmode is not None and tmode not in inits:
                t0 = time.time()
                model, report = from_donor(donor_dir, cfg, mode=tmode)
                inits[tmode] = write_transfer(vdir / f"init-{tmode}", model, cfg, report)
                del model
                print(f"[xatl] {variant}: transfer {tmode} ({time.time() - t0:.0f} s)", flush=True)
            arm = copy.deepcopy(cfg)
            arm.train.out_dir = str(vdir / name)
            arm.transfer.donor = None
            arm.transfer.mode = tmode or DEFAULT_MODE
            arm.train.init_from = str(inits[tmode]) if tmode else None
            if lit:
                f = arm.transfer.freeze
                f.policy, f.window, f.threshold = "lit", args.lit_window, args.lit_threshold
                f.patience, f.warmup_steps = args.lit_patience, args.lit_warmup
            t0 = time.time()
            print(f"[xatl] {variant} {pattern}: training {name}, {arm.train.steps} steps", flush=True)
            run(arm, source=str(CONFIG))
            wall = time.time() - t0
            rec = {"mode": tmode, "lit": lit, "curve": eval_curve(vdir / name), "wall_s": round(wall, 1),
                   "step_s": mean_step_seconds(vdir / name, tokens_per_step)}
            if lit:
                rec["unfreeze_step"] = unfreeze_step(vdir / name)
            vres["arms"][name] = rec
            print(f"[xatl] {name}: final val loss {rec['curve'][-1]['val_loss']:.3f}, "
                  f"{wall:.0f} s wall, {rec['step_s']:.2f} s/step"
                  + (f", LIT unfroze at step {rec['unfreeze_step']}" if lit else ""), flush=True)
            save()
        if "scratch" in vres["arms"]:
            sp = speedups({n: a["curve"] for n, a in vres["arms"].items()})
            for n, s in sp.items():
                vres["arms"][n]["speedup"] = s
        save()

    # report
    print()
    for variant, vres in results["variants"].items():
        arms = vres["arms"]
        print(f"[xatl] {variant} ({vres['pattern']}): validation loss / bits per byte at equal steps")
        steps = [r["step"] for r in arms[next(iter(arms))]["curve"]]
        print(f"{'step':>5} " + " ".join(f"{n:>22}" for n in arms))
        for i, st in enumerate(steps):
            cells = []
            for a in arms.values():
                r = a["curve"][i] if i < len(a["curve"]) else None
                cells.append(f"{r['val_loss']:>12.3f} / {r['val_bpb']:.3f}" if r else " " * 22)
            print(f"{st:>5} " + " ".join(f"{c:>22}" for c in cells))
        if "scratch" in arms:
            print(f"speedup to scratch's final val loss {arms['scratch']['curve'][-1]['val_loss']:.3f}:")
            for n, a in arms.items():
                s = a["speedup"]
                at = "never reached" if s["steps_to_target"] is None else f"reached at step {s['steps_to_target']:.1f}"
                extra = f"  (LIT unfroze at step {a.get('unfreeze_step')})" if a["lit"] else ""
                print(f"  {n:>22}: {fmt_speedup(s):>12}  {at}{extra}")
        print()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results["variants"])
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, 4.6), squeeze=False)
    for ax, (variant, vres) in zip(axes[0], results["variants"].items()):
        plot_into(ax, {name: a["curve"] for name, a in vres["arms"].items()},
                  f"{vres['pattern']} ({variant}), SmolLM2-135M donor, Brown, {mode['steps']} steps")
    fig.tight_layout()
    png = results_dir / f"{json_name}.png"
    fig.savefig(png, dpi=110)
    fig.savefig(root / png.name, dpi=110)
    plt.close(fig)
    results["wall_min"] = round((time.time() - t_start) / 60, 1)
    save()
    print(f"[xatl] plot {png}; curves {results_dir / (json_name + '.json')}; run {root} "
          f"({results['wall_min']} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
