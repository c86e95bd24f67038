"""XATL at full depth: SmolLM2-135M (all 30 layers, real weights) into 50% and 75% Mamba hybrids.

Same data (Brown, the donor's tokenizer, 12 documents held out for validation), same seed, same
steps, tokens and LR schedule for every arm. Targets: `--targets 50,75` (15 resp. 22 of 30
attention layers replaced by Mamba, d_inner = the attention width 576). Arms:

    scratch                   random init, the fixed pattern
    xatl                      the paper's default copy mode, a fixed pattern (50%: attention at
                              every odd layer; 75%: 8 evenly spaced layers)
    xatl+selected             the attention layers kept are those whose removal costs the donor
                              most on calibration text (transfer.keep_attention, select-layers)
    xatl+attn-init            fixed pattern, Q/K/V/O into the Mamba mixers (MambaInLlama)
    xatl+distill              fixed pattern, distillation from the donor (train.distill)
    selected+distill          both
    selected+distill+attn-init
    donor                     the donor itself, evaluated on the same validation batches (step 0)

Calibration text for the selection is this repository's README.md (not Brown: nothing of the
validation split is seen). Per arm: val loss and bits per byte against tokens, the gap to the
donor's bits per byte, tokens to reach scratch's final val loss, tokens to come within 10% of the
donor's bits per byte.

    .venv/bin/python benchmarks/xatl_full_depth.py --quick   # 50% only, 5 arms, < 5 min
    .venv/bin/python benchmarks/xatl_full_depth.py           # both targets, every arm (~60 min)

Results: benchmarks/results/xatl_full_depth[_quick].{json,png} and the run folder under runs/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import time
from pathlib import Path

from megaxatl.demo import eval_curve, prepare_corpus

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "mamba_smollm2_135m.json"
CALIBRATION = ROOT / "README.md"
N = 30
DEFAULT_MODE = "emb+norm+mlp+oproj"
# arm -> (transfer mode or None, selected layers?, distill?)
ARMS = {
    "scratch": (None, False, False),
    "xatl": (DEFAULT_MODE, False, False),
    "xatl+selected": (DEFAULT_MODE, True, False),
    "xatl+attn-init": ("attn-init", False, False),
    "xatl+distill": (DEFAULT_MODE, False, True),
    "selected+distill": (DEFAULT_MODE, True, True),
    "selected+distill+attn-init": ("attn-init", True, True),
}
# target -> attention layers kept, fixed pattern
KEEP = {"50": 15, "75": 8}
FIXED = {"50": [i for i in range(N) if i % 2 == 1], "75": [int((i + 0.5) * N / 8) for i in range(8)]}

# Full: ~8 s per 8 x 128 step at full depth on 2 shared cores (+~40% with a teacher forward),
# 14 arms x 24 steps + evals ~ 60 min. calib_tokens: README tokens the selection's donor forwards
# read (one forward per candidate layer, 32 in all at 30 layers: the largest fixed cost of --quick).
# Both modes use sequences of 128 so that the demo's tokenized Brown is reused.
FULL = dict(targets=["50", "75"], arms=list(ARMS), steps=24, eval_interval=4, eval_steps=4, batch=8, seq_len=128,
            align_steps=4, calib_tokens=4096)
QUICK = dict(targets=["50"], arms=["scratch", "xatl", "xatl+selected", "selected+distill"], steps=6,
             eval_interval=3, eval_steps=2, batch=2, seq_len=128, align_steps=1, calib_tokens=1024)



def drop_weights(run_dir: Path) -> None:
    """An arm's checkpoints and final export (~1.5 GB each at 135M) are not needed once its curve
    is read: the metrics stay, so a full run does not leave tens of GB behind."""
    for sub in ("checkpoints", "final"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)

def first_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First x (linearly interpolated) where y <= target; None if never."""
    if points and points[0][1] <= target:
        return float(points[0][0])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target < y0:
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    return None


def summarize(arms: dict, donor_bpb: float, tokens_per_step: int) -> None:
    """Adds to each arm: final loss/bpb, gap to the donor, tokens to scratch's final loss and to
    within 10% of the donor's bits per byte."""
    scratch_final = arms["scratch"]["curve"][-1]["val_loss"] if "scratch" in arms else None
    for a in arms.values():
        c = a["curve"]
        loss_pts = [(r["step"] * tokens_per_step, r["val_loss"]) for r in c]
        bpb_pts = [(r["step"] * tokens_per_step, r["val_bpb"]) for r in c]
        a["final_val_loss"], a["final_val_bpb"] = c[-1]["val_loss"], c[-1]["val_bpb"]
        a["gap_to_donor_bpb"] = c[-1]["val_bpb"] / donor_bpb - 1
        a["tokens_to_scratch_final"] = first_reach(loss_pts, scratch_final) if scratch_final else None
        a["tokens_to_donor_10pct"] = first_reach(bpb_pts, 1.1 * donor_bpb)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="50%% target, 4 arms + the donor, 6 short steps (< 5 min)")
    p.add_argument("--steps", type=int)
    p.add_argument("--targets", help="comma list of 50,75")
    p.add_argument("--arms", help="comma list of arms (scratch is needed for tokens-to-scratch)")
    p.add_argument("--tag", help="results go to xatl_full_depth_<tag>.{json,png}")
    p.add_argument("--out", default=str(ROOT / "runs"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    import torch

    from megaxatl.assets.donors import resolve_donor
    from megaxatl.config import load_config
    from megaxatl.train import run
    from megaxatl.transfer import from_donor, write_transfer
    from megaxatl.transfer.donor_model import calibration_ids, donor_model
    from megaxatl.transfer.select import select_layers

    mode = copy.deepcopy(QUICK if args.quick else FULL)
    if args.steps:
        mode["steps"] = args.steps
    if args.targets:
        mode["targets"] = args.targets.split(",")
    if args.arms:
        mode["arms"] = [a for a in args.arms.split(",") if a in ARMS]
    t_start = time.time()
    root = Path(args.out) / time.strftime("xatl-full-%Y%m%d-%H%M%S")
    root.mkdir(parents=True)
    name = f"xatl_full_depth_{args.tag}" if args.tag else ("xatl_full_depth_quick" if args.quick else "xatl_full_depth")
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    print(f"[full-depth] writing into {root}; {mode}", flush=True)

    base = load_config(CONFIG)
    donor_dir = resolve_donor(base.transfer.donor)
    data = prepare_corpus(donor_dir, mode["seq_len"], 12)
    b, t = base.data, base.train
    b.train_shards = b.val_shards = str(data)
    b.seq_len, b.micro_batch_size = mode["seq_len"], mode["batch"]
    t.steps, t.eval_interval, t.eval_steps = mode["steps"], mode["eval_interval"], mode["eval_steps"]
    t.lr, t.min_lr, t.warmup_steps, t.dtype = 1e-3, 1e-4, 2, "fp32"
    t.save_interval, t.keep_last = 10_000, 1
    base.transfer.freeze.policy = "none"
    base.logging.log_interval = 1
    base.logging.progress = False
    tokens_per_step = b.micro_batch_size * b.seq_len

    results = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "platform": platform.platform()},
               "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "run_dir": str(root),
               "settings": {**mode, "lr": t.lr, "min_lr": t.min_lr, "warmup_steps": t.warmup_steps,
                            "seed": t.seed, "tokens_per_step": tokens_per_step,
                            "distill": {"weight": 0.8, "temperature": 1.0, "align_steps": mode["align_steps"]}},
               "targets": {}}

    def save():
        (results_dir / f"{name}.json").write_text(json.dumps(results, indent=1))

    # the donor: per-layer costs once (README text), and its own val bits per byte
    t0 = time.time()
    teacher = donor_model(donor_dir)
    ids = calibration_ids(CALIBRATION, teacher[1], mode["calib_tokens"], 256)
    selections = {k: select_layers(teacher[0], ids, KEEP[k], method="greedy") for k in mode["targets"]}
    del teacher
    for k, sel in selections.items():
        print(sel.table(), flush=True)
    print(f"[full-depth] selection: {time.time() - t0:.0f} s", flush=True)
    donor_cfg = copy.deepcopy(base)
    donor_cfg.model.pattern = "*" * N
    donor_cfg.train.steps = 1
    donor_cfg.train.out_dir = str(root / "donor")
    donor_cfg.transfer.donor = str(donor_dir)
    run(donor_cfg)
    donor_curve = eval_curve(root / "donor")
    drop_weights(root / "donor")
    donor_bpb = donor_curve[0]["val_bpb"]
    results["donor"] = {"val_loss": donor_curve[0]["val_loss"], "val_bpb": donor_bpb}
    print(f"[full-depth] donor: val loss {donor_curve[0]['val_loss']:.3f}, {donor_bpb:.3f} bits/byte", flush=True)

    for k in mode["targets"]:
        sel = selections[k]
        patterns = {False: "".join("*" if i in FIXED[k] else "M" for i in range(N)), True: sel.pattern("M")}
        tres = results["targets"][k] = {"keep": KEEP[k], "fixed_pattern": patterns[False],
                                        "selected_pattern": patterns[True], "selection": sel.to_dict(), "arms": {}}
        inits: dict[tuple, Path] = {}
        for arm_name in mode["arms"]:
            tmode, selected, distill = ARMS[arm_name]
            cfg = copy.deepcopy(base)
            cfg.model.pattern = patterns[selected]
            if tmode is not None and (tmode, selected) not in inits:
                model, report = from_donor(donor_dir, cfg, mode=tmode)
                inits[(tmode, selected)] = write_transfer(root / k / f"init-{tmode}-{int(selected)}", model, cfg, report)
                del model
            cfg.train.out_dir = str(root / k / arm_name)
            cfg.transfer.donor = None
            cfg.transfer.mode = tmode or DEFAULT_MODE
            cfg.train.init_from = str(inits[(tmode, selected)]) if tmode else None
            if distill:
                d = cfg.train.distill
                d.teacher, d.weight, d.temperature, d.align_steps = str(donor_dir), 0.8, 1.0, mode["align_steps"]
            t0 = time.time()
            print(f"[full-depth] {k}% {cfg.model.pattern}: {arm_name}", flush=True)
            run(cfg)
            tres["arms"][arm_name] = {"pattern": cfg.model.pattern, "curve": eval_curve(root / k / arm_name),
                                      "wall_s": round(time.time() - t0, 1)}
            drop_weights(root / k / arm_name)
            c = tres["arms"][arm_name]["curve"][-1]
            print(f"[full-depth] {arm_name}: val loss {c['val_loss']:.3f}, {c['val_bpb']:.3f} bits/byte "
                  f"({time.time() - t0:.0f} s)", flush=True)
            save()
        summarize(tres["arms"], donor_bpb, tokens_per_step)
        save()

    print(f"\n[full-depth] donor bits per byte {donor_bpb:.3f}; {tokens_per_step} tokens a step")
    for k, tres in results["targets"].items():
        print(f"[full-depth] {k}% hybrid ({tres['keep']} of {N} attention layers kept)")
        print(f"{'arm':>28} {'val loss':>9} {'bpb':>7} {'gap':>7} {'tok->scratch':>13} {'tok->donor+10%':>15}")
        for an, a in tres["arms"].items():
            f = lambda v: "never" if v is None else f"{v:.0f}"  # noqa: E731
            print(f"{an:>28} {a['final_val_loss']:>9.3f} {a['final_val_bpb']:>7.3f} {100 * a['gap_to_donor_bpb']:>6.1f}% "
                  f"{f(a['tokens_to_scratch_final']):>13} {f(a['tokens_to_donor_10pct']):>15}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["targets"]), figsize=(6.8 * len(results["targets"]), 4.6), squeeze=False)
    for ax, (k, tres) in zip(axes[0], results["targets"].items()):
        for an, a in tres["arms"].items():
            ax.plot([r["step"] * tokens_per_step for r in a["curve"]], [r["val_bpb"] for r in a["curve"]],
                    marker="o", label=an)
        ax.axhline(donor_bpb, color="k", ls="--", label=f"donor {donor_bpb:.3f}")
        top = max(r["val_bpb"] for a in tres["arms"].values() for r in a["curve"][1:] or a["curve"]) * 1.1
        ax.set_ylim(bottom=donor_bpb * 0.9, top=top)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation bits per byte")
        ax.set_title(f"{k}% Mamba hybrid of SmolLM2-135M (30 layers), Brown")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir / f"{name}.png", dpi=110)
    plt.close(fig)
    results["wall_min"] = round((time.time() - t_start) / 60, 1)
    save()
    print(f"[full-depth] plot {results_dir / (name + '.png')}; {results['wall_min']} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
