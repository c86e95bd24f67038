"""Peak host memory and time per rank of the trainer's construction path (build and load only).

    python benchmarks/init_memory.py --config configs/mamba_2.8b.json --tp 2 --pp 2 \
        [--init-from DIR | --make-init DIR [--init-dtype bf16]] [--ranks N]

Each of tp x pp x dp CPU ranks (torchrun, gloo) runs what `Trainer` runs before DeepSpeed's
engine: the layout check, the meta-device model, tensor parallelism on it, then storage and
values for this rank's part only (scratch, or its slices of `--init-from`). Each rank reports
its peak RSS (getrusage) and its time. The reference, measured in the same run in a fresh
process, is the old path: the whole model built and initialised in fp32 on every rank.

Target: every rank <= 1.2 x (full fp32 model bytes / (tp x pp)) + 1 GiB.

--make-init DIR first writes a scratch init of the config as a sharded model folder at tp x pp
(tensor by tensor, transfer/stream.py's source with no donor), to start from with --init-from.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

GiB = 1024**3
REPO = Path(__file__).resolve().parent.parent


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> None:
    import torch

    from megaxatl.checkpoint.sharded import check_layout
    from megaxatl.config import load_config
    from megaxatl.models import build
    from megaxatl.train.engine import init_distributed
    from megaxatl.train.init import plan_initial
    from megaxatl.train.parallelize import parallel_state, parallelize

    cfg = load_config(args.config)
    cfg.parallel.tp, cfg.parallel.pp = args.tp, args.pp
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
    local = sum(p.numel() for _, p in built.named)
    real = sum(p.numel() for p in lm.parameters() if p.device.type != "meta")
    out = {"rank": rank, "tp_rank": par.tp_rank, "pp_rank": par.pp_rank, "seconds": time.perf_counter() - t0,
           "peak_rss": peak_rss(), "local_params": local, "params_with_storage": real}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()


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
    p.add_argument("--out", default=None)
    p.add_argument("--role", choices=("main", "worker", "reference"), default="main", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "worker":
        worker(args)
        return 0
    if args.role == "reference":
        reference(args)
        return 0

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if args.make_init:
        make_init(args)
        args.init_from = args.make_init
    ref = json.loads(subprocess.run([sys.executable, __file__, "--config", args.config, "--role", "reference"],
                                    env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    out = Path(args.out or f"/tmp/init_memory_{os.getpid()}")
    out.mkdir(parents=True, exist_ok=True)
    ranks = args.ranks or args.tp * args.pp
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_port",
           str(29500 + os.getpid() % 1000), __file__, "--config", args.config, "--tp", str(args.tp), "--pp",
           str(args.pp), "--role", "worker", "--out", str(out)]
    if args.init_from:
        cmd += ["--init-from", args.init_from]
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    full = ref["params"] * 4
    target = 1.2 * full / (args.tp * args.pp) + GiB
    print(f"{args.config}: {ref['params'] / 1e9:.2f}B parameters, full fp32 model {full / GiB:.2f} GiB; "
          f"tp={args.tp} x pp={args.pp}, {ranks} ranks, init: {args.init_from or 'scratch'}")
    print(f"reference (old path: whole fp32 model on every rank): peak RSS {ref['peak_rss'] / GiB:.2f} GiB, "
          f"{ref['seconds']:.1f} s")
    print(f"target per rank: <= 1.2 x {full / GiB:.2f} / {args.tp * args.pp} + 1 = {target / GiB:.2f} GiB")
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
