"""Checkpoint I/O: `megaxatl reshard`'s peak memory against the model's size, and what the
layout-free state (weights/ + optimizer/) adds to a training checkpoint, measured.

    python benchmarks/checkpoint_io.py [--d-model 1024] [--layers 12] [--vocab 32000]

1. Reshard: a random model folder (safetensors, fp32) -> sharded TP 2 x PP 2 -> TP 4 x PP 1 ->
   one model folder again, each `megaxatl reshard` a child process reporting its own peak
   anonymous RSS. Reported as (peak - the same command's on a tiny model) / model bytes: the
   streaming target is "well under the model's size" (one tensor, plus the read-ahead of the
   writer threads, at a time). The last folder is checked equal to the first, tensor by tensor.
2. Checkpoint: one process, the model under DeepSpeed with torch AdamW after one optimizer step;
   DeepSpeed's own save_checkpoint against our layout-free save (weights + moments, with
   checksums) in the same run: seconds and bytes, their ratio, and what a checkpoint without
   DeepSpeed's files (train.save_deepspeed_state false) saves.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _config(args):
    from megaxatl.config import config_from_dict

    n = args.layers
    pattern = "".join("*" if i % 4 == 1 else "M" for i in range(n))
    return config_from_dict({
        "model": {"vocab_size": args.vocab, "d_model": args.d_model, "n_layers": n, "pattern": pattern,
                  "n_heads": 16, "n_kv_heads": 4, "d_mlp": 4 * args.d_model, "max_seq_len": 256,
                  "mamba": {"d_state": 16}},
        "data": {"seq_len": 64, "micro_batch_size": 1},
        "train": {"dtype": "fp32", "steps": 1, "out_dir": "/tmp/unused"},
    })


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# Runs the CLI in a fresh interpreter that samples its own anonymous resident memory (RssAnon)
# every 5 ms and writes the peak at exit. Anonymous, because reading a safetensors input maps the
# file: those pages are page cache the kernel drops under pressure, not memory the command holds.
# (getrusage's ru_maxrss would also count the parent's pages a forked child starts with.)
_RUN_CLI = """
import atexit, os, sys, threading, time
def anon():
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('RssAnon:')))
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
atexit.register(lambda: open(os.environ['PEAK_FILE'], 'w').write(str(max(peak[0], anon()))))
from megaxatl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _peak_rss(args: list[str], work: Path) -> tuple[float, float]:
    """Run `megaxatl *args`; -> (its peak anonymous RSS bytes, seconds)."""
    peak = work / "peak.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PEAK_FILE": str(peak)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN_CLI, *args], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"megaxatl {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return float(peak.read_text()) * 1024, seconds


def reshard(args, root: Path, cfg) -> None:
    import torch

    from megaxatl.checkpoint import load_model_dir, save_model_dir
    from megaxatl.config import config_to_dict
    from megaxatl.models import build

    torch.manual_seed(0)
    model = build(cfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() * v.element_size() for v in state.values())
    save_model_dir(root / "model", state, {"config": config_to_dict(cfg)})
    del model, state
    # the same command on a 2-layer d_model 64 model: imports, meta-device model, thread pools;
    # the fixed cost subtracted from every peak
    tiny = _config(argparse.Namespace(d_model=64, layers=2, vocab=512))
    save_model_dir(root / "tiny", {k: v.detach() for k, v in build(tiny).state_dict().items()},
                   {"config": config_to_dict(tiny)})
    base, _ = _peak_rss(["reshard", "--in", str(root / "tiny"), "--out", str(root / "tiny2"), "--tp", "2", "--pp", "2"],
                        root)
    steps = [("model folder -> TP 2 x PP 2", ["--in", root / "model", "--out", root / "tp2pp2", "--tp", "2", "--pp", "2"]),
             ("TP 2 x PP 2 -> TP 4 x PP 1", ["--in", root / "tp2pp2", "--out", root / "tp4", "--tp", "4", "--pp", "1"]),
             ("TP 4 x PP 1 -> model folder", ["--in", root / "tp4", "--out", root / "back", "--to", "model-dir"])]
    print(f"model: {model_bytes / 2**20:.0f} MiB fp32 ({model_bytes // 4 / 1e6:.0f}M parameters), largest tensor "
          f"{largest / 2**20:.0f} MiB; baseline anonymous RSS (a tiny model) {base / 2**20:.0f} MiB")
    print(f"{'reshard':<32}{'peak - baseline':>16}{'/ model':>9}{'seconds':>9}{'MiB/s':>8}")
    for label, a in steps:
        peak, seconds = _peak_rss(["reshard", *map(str, a)], root)
        extra = peak - base
        print(f"{label:<32}{extra / 2**20:>12.0f} MiB{extra / model_bytes:>9.2f}{seconds:>9.1f}"
              f"{model_bytes / 2**20 / seconds:>8.0f}")
    first, last = load_model_dir(root / "model")[0], load_model_dir(root / "back")[0]
    same = first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
    print(f"round trip bit-identical: {same}")
    if not same:
        raise SystemExit("round trip changed the weights")


def checkpoint(args, root: Path, cfg) -> None:
    import torch

    from megaxatl.checkpoint.sharded import check_layout
    from megaxatl.config import config_to_dict
    from megaxatl.fsutil import sha256_file
    from megaxatl.models import build
    from megaxatl.train import portable
    from megaxatl.train.deepspeed_internals import OptimizerView
    from megaxatl.train.engine import create_engine, init_distributed
    from megaxatl.train.optim import build_optimizer, param_groups
    from megaxatl.train.parallelize import parallel_state, parallelize

    init_distributed()
    torch.manual_seed(0)
    state = parallel_state(cfg, 1)
    built = parallelize(build(cfg), cfg, state)
    opt = build_optimizer(param_groups(built.module, [], cfg.train, named=built.named), cfg.train)
    engine = create_engine(built.module, opt, None, cfg, 1)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 64))
    engine.backward(engine(ids, labels=ids))
    engine.step()
    view = OptimizerView(engine.optimizer, opt)
    layout = check_layout(cfg.model, 1, 1)

    t0 = time.perf_counter()
    engine.save_checkpoint(str(root / "ds"), tag="t", save_latest=False)
    ds_s = time.perf_counter() - t0
    config = config_to_dict(cfg)
    t0 = time.perf_counter()
    portable.save_weights(root / "lf" / "weights", built.named, view, layout, state, config)
    w_s = time.perf_counter() - t0
    wrote = portable.save_optimizer(root / "lf" / "optimizer", built.named, view, layout, state, config)
    lf_s = time.perf_counter() - t0
    assert wrote
    t0 = time.perf_counter()
    for f in sorted((root / "lf").rglob("*.distcp")):
        sha256_file(f)
    hash_s = time.perf_counter() - t0
    ds_b, lf_b = _folder_bytes(root / "ds"), _folder_bytes(root / "lf")
    print(f"{'checkpoint (1 process)':<32}{'seconds':>9}{'MiB':>9}")
    print(f"{'DeepSpeed save_checkpoint':<32}{ds_s:>9.2f}{ds_b / 2**20:>9.0f}")
    print(f"{'layout-free weights/':<32}{w_s:>9.2f}{_folder_bytes(root / 'lf' / 'weights') / 2**20:>9.0f}")
    print(f"{'layout-free weights+optimizer':<32}{lf_s:>9.2f}{lf_b / 2**20:>9.0f}")
    print(f"  of which sha256 (re-measured)  {hash_s:>8.2f}")
    print(f"layout-free / DeepSpeed: time {lf_s / ds_s:.2f}x, bytes {lf_b / ds_b:.2f}x")
    print(f"a checkpoint with both (the default): {ds_s + lf_s:.2f} s, {(ds_b + lf_b) / 2**20:.0f} MiB; layout-free "
          f"only (train.save_deepspeed_state false): {lf_s / (ds_s + lf_s):.2f}x the time, "
          f"{lf_b / (ds_b + lf_b):.2f}x the bytes")
    engine.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="megaxatl-ckpt-io-"))
    try:
        cfg = _config(args)
        reshard(args, root, cfg)
        checkpoint(args, root, cfg)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
