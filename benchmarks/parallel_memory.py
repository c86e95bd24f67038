"""Per-rank parameter and optimizer-state bytes at TP x PP x ZeRO layouts, measured.

    python benchmarks/parallel_memory.py [--ranks 4] [--d-model 256] [--layers 8]

For each layout, `--ranks` CPU processes (gloo, torchrun) build the model the trainer's way
(build -> tensor parallel -> pipeline stage -> DeepSpeed with torch AdamW), run one optimizer
step on random tokens, and count the bytes each rank holds (distinct storages): parameters (the
module's) and optimizer state (Adam's moments, plus ZeRO's fp32 master partitions). Printed next
to the reference measured in the same run (TP 1 x PP 1, ZeRO 0) as a ratio, and the expected
fraction: parameters 1 / (tp x pp); optimizer 1 / (tp x pp), and / dp more with ZeRO >= 1
(ZeRO-1/2 keep an fp32 master partition besides the moments: 3 / 2 of the moments' bytes).
Replicated tensors (norms, biases, KV heads fewer than ranks) make the measured fractions a bit
larger than the ideal. The worst rank is reported (pipeline stages differ: the first holds the
embedding, the last the head).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = [(1, 1, 0), (1, 1, 1), (1, 1, 2), (2, 1, 0), (2, 1, 1), (1, 2, 0), (1, 2, 1), (2, 2, 0), (2, 2, 1)]


def _config(args, tp, pp, zero):
    from megaxatl.config import config_from_dict

    n = args.layers
    pattern = "".join("*" if i % 4 == 1 else "M" for i in range(n))
    return config_from_dict({
        "model": {"vocab_size": 8192, "d_model": args.d_model, "n_layers": n, "pattern": pattern,
                  "n_heads": 8, "d_mlp": 4 * args.d_model, "max_seq_len": 256, "mamba": {"d_state": 16}},
        "parallel": {"tp": tp, "pp": pp, "zero_stage": zero},
        "data": {"seq_len": 64, "micro_batch_size": 2},
        "train": {"dtype": "fp32", "steps": 1, "out_dir": "/tmp/unused"},
    })


def worker(args) -> None:
    import torch

    from megaxatl.cluster.plan import storage_bytes
    from megaxatl.models import build
    from megaxatl.train.engine import create_engine, init_distributed
    from megaxatl.train.optim import build_optimizer, param_groups
    from megaxatl.train.parallelize import parallel_state, parallelize

    rank, world, _ = init_distributed()
    tp, pp, zero = args.layout
    cfg = _config(args, tp, pp, zero)
    state = parallel_state(cfg, world)
    torch.manual_seed(0)
    built = parallelize(build(cfg), cfg, state)
    opt = build_optimizer(param_groups(built.module, [], cfg.train, named=built.named), cfg.train)
    engine = create_engine(built.module, opt, None, cfg, world, mpu=built.mpu)
    g = torch.Generator().manual_seed(state.dp_rank)

    def batch():
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch_size, cfg.data.seq_len + 1), generator=g)
        return ids[:, :-1], ids[:, 1:]

    if pp > 1:
        engine.train_batch(data_iter=iter([batch()]))
    else:
        ids, labels = batch()
        engine.backward(engine(ids, labels=labels))
        engine.step()
    seen: set = set()
    params = storage_bytes(engine.module.parameters(), seen)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optim = storage_bytes((p for grp in inner.param_groups for p in grp["params"]), seen)  # ZeRO's fp32 partitions
    optim += storage_bytes((v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)
                      and v.dim() > 0), seen)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"params": params, "optim": optim, "dp": state.dp}))
    engine.destroy()
    torch.distributed.destroy_process_group()


def launch(args, layout, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.ranks), "--master_port",
           str(_free_port()), __file__, "--worker", "--layout", *map(str, layout), "--out", str(out),
           "--d-model", str(args.d_model), "--layers", str(args.layers)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"layout {layout} failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", type=int, nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in LAYOUTS:
            if args.ranks % (layout[0] * layout[1]):
                continue
            res = launch(args, layout, Path(tmp) / "_".join(map(str, layout)))
            rows.append((layout, max(r["params"] for r in res), max(r["optim"] for r in res), res[0]["dp"]))
    base_p, base_o = rows[0][1], rows[0][2]
    print(f"per-rank bytes, {args.ranks} CPU ranks, d_model {args.d_model}, {args.layers} layers, fp32, AdamW; "
          f"reference TP1 PP1 ZeRO0: params {base_p / 2**20:.1f} MiB, optimizer {base_o / 2**20:.1f} MiB")
    print(f"{'TP':>3} {'PP':>3} {'DP':>3} {'ZeRO':>4} | {'params MiB':>10} {'ratio':>6} {'expect':>6} | "
          f"{'optim MiB':>10} {'ratio':>6} {'expect':>6}")
    for (tp, pp, zero), prm, opt, dp in rows:
        exp_p = 1 / (tp * pp)
        exp_o = exp_p * (1.5 / dp if zero >= 1 else 1.0)
        print(f"{tp:>3} {pp:>3} {dp:>3} {zero:>4} | {prm / 2**20:>10.2f} {prm / base_p:>6.3f} {exp_p:>6.3f} | "
              f"{opt / 2**20:>10.2f} {opt / base_o:>6.3f} {exp_o:>6.3f}")


if __name__ == "__main__":
    main()
