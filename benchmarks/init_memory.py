"""Peak host memory and time per rank of the trainer's construction path (build and load only),
or of the trainer itself for a few steps.

    python benchmarks/init_memory.py --config configs/mamba_2.8b.json --tp 2 --pp 2 \
        [--init-from DIR | --make-init DIR [--init-dtype bf16]] [--ranks N]
    python benchmarks/init_memory.py --config configs/retneox_1b.json --train-steps 2 \
        [--tp 2 | --pp 2 | --zero 3 --ranks 4]

Each of tp x pp x dp CPU ranks (torchrun, gloo) runs what `Trainer` runs before DeepSpeed's
engine: the layout check, the meta-device model, tensor parallelism on it, then storage and
values for this rank's part only (scratch, or its slices of `--init-from`). Each rank reports
its peak RSS (getrusage) and its time. The reference, measured in the same run in a fresh
process, is the old path: the whole model built and initialised in fp32 on every rank.

Target: every rank <= 1.2 x (full fp32 model bytes / (tp x pp)) + 1 GiB; with --zero 3 the
parameters are partitioned over the data-parallel ranks too: / (tp x pp x dp).

--train-steps N runs the real `Trainer` (construction, DeepSpeed's engine, N optimizer steps,
the final checkpoint and export) on each rank, fp32, 1 x 64-token micro-batches of this
repository's markdown tokenized with the SmolLM2 tokenizer; each rank reports its peak RSS over
the whole run (the final checkpoint and export included), at the end of construction (DeepSpeed's
engine included) and at its first step, with the times. Training state (gradients, Adam's two
moments) is 3x the parameters' bytes on top, so the build-only target does not apply; the same
reference is printed beside it. --dry-start constructs the Trainer and stops before the first step.

--make-init DIR first writes a scratch init of the config as a sharded model folder at tp x pp
(tensor by tensor, transfer/stream.py's source with no donor), to start from with --init-from.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

GiB = 1024**3
SMOLLM2_VOCAB = 49152
REPO = Path(__file__).resolve().parent.parent


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> None:
    import torch

    from megaxatl.checkpoint.sharded import check_layout
    from megaxatl.config import load_config
    from megaxatl.models import build
    from megaxatl.train.engine import init_distributed
    from megaxatl.train.init import plan_initial, stored_elements
    from megaxatl.train.parallelize import parallel_state, parallelize

    cfg = load_config(args.config)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = args.tp, args.pp, args.zero
    cfg.train.init_from = args.init_from
    cfg.transfer.donor = None
    t0 = time.perf_counter()
    rank, world, _ = init_distributed()
    layout = check_layout(cfg.model, args.tp, args.pp)
    par = parallel_state(cfg, world)
    init = plan_initial(cfg, resuming=False)
    with torch.device("meta"):
        lm = build(cfg)
    built = parallelize(lm, cfg, par, fill=init.fill, layout=layout)
    local = sum(stored_elements(p) for _, p in built.named)  # ZeRO-3: this rank's partitions
    real = sum(stored_elements(p) for p in lm.parameters() if p.device.type != "meta")
    out = {"rank": rank, "tp_rank": par.tp_rank, "pp_rank": par.pp_rank, "seconds": time.perf_counter() - t0,
           "peak_rss": peak_rss(), "local_params": local, "params_with_storage": real}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()


def train_worker(args) -> None:
    """One rank of the real trainer: construction, then `train.steps` steps (or none: --dry-start)."""
    start = time.time()
    from megaxatl.config import load_config
    from megaxatl.train.init import stored_elements as held  # a ZeRO-3 partition, or the whole tensor
    from megaxatl.train.trainer import Trainer

    trainer = Trainer(load_config(args.config))
    out = {"rank": trainer.rank, "built_seconds": time.time() - start, "built_rss": peak_rss(),
           "local_params": sum(held(p) for _, p in trainer.built.named), "completed": True}
    log_train = trainer.metrics.train  # called on every rank after each step: the first step's mark

    def first_step_mark(step, *a, **k):
        if step == 1:
            out.update(first_step_seconds=time.time() - start, first_step_rss=peak_rss())
        return log_train(step, *a, **k)

    trainer.metrics.train = first_step_mark
    try:
        if not args.dry_start:
            out["completed"] = trainer.fit().completed
    finally:
        trainer.close()
    out.update(seconds=time.time() - start, peak_rss=peak_rss())
    Path(args.out, f"rank{trainer.rank}.json").write_text(json.dumps(out))


def train_config(args, out: Path) -> Path:
    """--config with this run's layout, the repository's markdown as data, N fp32 steps."""
    from megaxatl.assets.donors import resolve_donor
    from megaxatl.data import prepare_data

    cfg = json.loads(Path(args.config).read_text())
    if cfg["model"]["vocab_size"] < SMOLLM2_VOCAB:
        raise SystemExit(f"--train-steps: {args.config}: model.vocab_size {cfg['model']['vocab_size']} is "
                         f"smaller than the SmolLM2 tokenizer's {SMOLLM2_VOCAB} the data is tokenized with")
    data = out / "data"
    if not (data / "manifest.json").exists():
        docs = sorted(p for p in REPO.rglob("*.md") if ".venv" not in p.parts)
        prepare_data(docs, data, tokenizer=resolve_donor("smollm2-135m"), seq_len=64, val_docs=1, num_proc=1)
    cfg["parallel"] = {"tp": args.tp, "pp": args.pp, "zero_stage": args.zero}
    cfg["data"] = {"train_shards": str(data), "seq_len": 64, "micro_batch_size": 1, "num_workers": 0}
    cfg["transfer"] = {}
    cfg["train"] = {**cfg.get("train", {}), "steps": args.train_steps, "dtype": "fp32", "warmup_steps": 1,
                    "save_interval": args.train_steps, "eval_interval": 10**9, "out_dir": str(out / "run"),
                    "init_from": None}
    cfg["logging"] = {"wandb_mode": "disabled", "progress": False, "log_interval": 1}
    path = out / "train_config.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def report_training(args, ref: dict, out: Path, ranks: int) -> int:
    full = ref["params"] * 4
    what = "build + DeepSpeed engine only (--dry-start)" if args.dry_start else f"{args.train_steps} steps (fp32)"
    print(f"{args.config}: {ref['params'] / 1e9:.2f}B parameters, full fp32 model {full / GiB:.2f} GiB; "
          f"tp={args.tp} x pp={args.pp} x zero {args.zero}, {ranks} ranks, {what}")
    print(f"reference (old path: whole fp32 model built on every rank, before any training state): "
          f"peak RSS {ref['peak_rss'] / GiB:.2f} GiB, {ref['seconds']:.1f} s")
    ok = True
    for f in sorted(out.glob("rank*.json"), key=lambda f: int(f.stem[4:])):
        r = json.loads(f.read_text())
        ok &= r["completed"]
        line = (f"  rank {r['rank']}: {r['local_params'] / 1e6:.0f}M local parameters; built in "
                f"{r['built_seconds']:.1f} s at peak RSS {r['built_rss'] / GiB:.2f} GiB "
                f"({r['built_rss'] / ref['peak_rss']:.2f}x the reference)")
        if "first_step_seconds" in r:
            # fp32 parameters, gradients and Adam's two moments: 16 bytes per local parameter
            state = 16 * r["local_params"]
            line += (f"; first step done at {r['first_step_seconds']:.1f} s, peak RSS {r['first_step_rss'] / GiB:.2f} "
                     f"GiB (training state {state / GiB:.2f} GiB + {(r['first_step_rss'] - state) / GiB:.2f})")
        line += f"; run peak RSS {r['peak_rss'] / GiB:.2f} GiB, {r['seconds']:.1f} s in all"
        print(line)
    return 0 if ok else 1


def reference(args) -> None:
    """The old path, in this fresh process: the whole model in fp32, initialised."""
    import torch

    from megaxatl.config import load_config
    from megaxatl.models import build

    cfg = load_config(args.config)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss(), "params": n}))


def make_init(args) -> None:
    import torch

    from megaxatl.checkpoint.sharded import check_layout, save_sharded_dir
    from megaxatl.config import config_to_dict, load_config
    from megaxatl.transfer.stream import TransferSource

    cfg = load_config(args.config)
    layout = check_layout(cfg.model, args.tp, args.pp)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.init_dtype]
    t0 = time.perf_counter()
    source = TransferSource(None, SimpleNamespace(copies=[]), cfg, dtype, cfg.train.seed, layout.shapes)
    save_sharded_dir(args.make_init, source, layout, config_to_dict(cfg), {"source": "benchmarks/init_memory.py"})
    print(f"wrote {args.make_init} ({args.init_dtype}, tp={args.tp} x pp={args.pp}) in "
          f"{time.perf_counter() - t0:.0f} s, peak RSS {peak_rss() / GiB:.2f} GiB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ranks", type=int, default=None, help="default tp x pp (one data-parallel replica)")
    p.add_argument("--init-from", default=None, help="a weights folder (sharded model folder, model folder)")
    p.add_argument("--make-init", default=None, help="write a scratch sharded init here first, and use it")
    p.add_argument("--init-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--train-steps", type=int, default=0, help="run the trainer this many steps (0: build only)")
    p.add_argument("--dry-start", action="store_true",
                   help="with --train-steps: construct the Trainer (DeepSpeed's engine included), no step")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage (3: parameters partitioned over DP)")
    p.add_argument("--out", default=None)
    p.add_argument("--role", choices=("main", "worker", "train-worker", "reference"), default="main",
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role in ("worker", "train-worker"):
        (worker if args.role == "worker" else train_worker)(args)
        return 0
    if args.role == "reference":
        reference(args)
        return 0

    out = Path(args.out or f"/tmp/init_memory_{os.getpid()}")
    if args.train_steps and (args.init_from or args.make_init):
        raise SystemExit("--train-steps starts from scratch; --init-from / --make-init are for build-only runs")
    if args.train_steps and (out / "run").exists():  # never resume or replace an earlier run by accident
        raise SystemExit(f"{out / 'run'} exists: give a fresh --out")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if args.make_init:
        make_init(args)
        args.init_from = args.make_init
    ref = json.loads(subprocess.run([sys.executable, __file__, "--config", args.config, "--role", "reference"],
                                    env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank*.json"):
        f.unlink()
    ranks = args.ranks or args.tp * args.pp
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_port",
           str(29500 + os.getpid() % 1000), __file__, "--tp", str(args.tp), "--pp", str(args.pp), "--out", str(out)]
    cmd += ["--zero", str(args.zero)] + (["--dry-start"] if args.dry_start else [])
    if args.train_steps:
        cmd += ["--config", str(train_config(args, out)), "--role", "train-worker"]
    else:
        cmd += ["--config", args.config, "--role", "worker"] + (["--init-from", args.init_from] if args.init_from else [])
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    if args.train_steps:
        code = report_training(args, ref, out, ranks)
        if (out / "run").exists():
            shutil.rmtree(out / "run")  # this run's own checkpoint and export (several GB at 1B)
        return code
    full = ref["params"] * 4
    split = args.tp * args.pp * (ranks // (args.tp * args.pp) if args.zero == 3 else 1)  # ZeRO-3: over DP too
    target = 1.2 * full / split + GiB
    print(f"{args.config}: {ref['params'] / 1e9:.2f}B parameters, full fp32 model {full / GiB:.2f} GiB; "
          f"tp={args.tp} x pp={args.pp}, zero {args.zero}, {ranks} ranks, init: {args.init_from or 'scratch'}")
    print(f"reference (old path: whole fp32 model on every rank): peak RSS {ref['peak_rss'] / GiB:.2f} GiB, "
          f"{ref['seconds']:.1f} s")
    print(f"target per rank: <= 1.2 x {full / GiB:.2f} / {split} + 1 = {target / GiB:.2f} GiB")
    ok = True
    for f in sorted(out.glob("rank*.json"), key=lambda f: int(f.stem[4:])):
        r = json.loads(f.read_text())
        fits = r["peak_rss"] <= target
        ok &= fits
        print(f"  rank {r['rank']} (tp {r['tp_rank']}, pp {r['pp_rank']}): peak RSS {r['peak_rss'] / GiB:.2f} GiB "
              f"({r['peak_rss'] / ref['peak_rss']:.2f}x the reference), {r['seconds']:.1f} s, "
              f"{r['local_params'] / 1e6:.0f}M local parameters, {r['params_with_storage'] / 1e6:.0f}M with storage "
              f"{'ok' if fits else 'OVER TARGET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
