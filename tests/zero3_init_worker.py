"""One rank of a ZeRO-3 construction (launched by torchrun from tests; no tests here).

    torchrun ... tests/zero3_init_worker.py --config C --out DIR

builds the config's LM as the trainer does (meta device, then unit by unit into ZeRO-3 partitions
over the DP group), then writes from rank 0: DIR/weights.safetensors (every parameter gathered,
fp32) and DIR/construction.json (the peak parameter elements a rank stored at once, the model's
element count, its largest unit's, the DP size)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megaxatl.checkpoint.sharded import check_layout
    from megaxatl.config import load_config
    from megaxatl.models import build
    from megaxatl.models.lm import build_unit, unit_names
    from megaxatl.train.engine import init_distributed
    from megaxatl.train.init import plan_initial
    from megaxatl.train.parallelize import parallel_state, parallelize

    cfg = load_config(args.config)
    rank, world, _ = init_distributed()
    state = parallel_state(cfg, world)
    layout = check_layout(cfg.model, cfg.parallel.tp, cfg.parallel.pp)
    with torch.device("meta"):
        lm = build(cfg)
    built = parallelize(lm, cfg, state, fill=plan_initial(cfg, resuming=False).fill, layout=layout)
    assert all(hasattr(q, "ds_id") for _, q in built.named), "a parameter left unpartitioned"
    full = {}
    for name, q in built.named:
        with deepspeed.zero.GatheredParameters([q]):
            full[name] = q.detach().float().clone()
    peak = torch.tensor([built.peak_elements])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file(full, str(out / "weights.safetensors"))
        unit = max(sum(t.numel() for t in build_unit(cfg.model, u, 0).parameters()) for u in unit_names(cfg.model))
        (out / "construction.json").write_text(json.dumps({
            "peak_elements": int(peak), "model_elements": sum(t.numel() for t in full.values()),
            "largest_unit": unit, "dp": state.dp}))
    dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
