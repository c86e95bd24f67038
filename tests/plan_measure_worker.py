"""Run by tests/test_cluster_plan.py under torchrun (2 CPU ranks, gloo):

    plan_measure_worker.py OUT_DIR CONFIG...

for each config, one DeepSpeed training step with torch AdamW, then the bytes of parameters,
gradients and optimizer state this rank holds (distinct storages, each counted once) written as
JSON to OUT_DIR/<config stem>-rank{r}.json. Not a test."""

import json
import sys
from pathlib import Path

import torch

from megaxatl.cluster.plan import storage_bytes as nbytes


def measure(cfg, rank: int, world: int) -> dict:
    from megaxatl.models import build
    from megaxatl.train.engine import create_engine

    torch.manual_seed(0)
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = create_engine(model, opt, None, cfg, world)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch_size, cfg.data.seq_len))
    loss = engine(ids).float().logsumexp(-1).mean()
    engine.backward(loss)
    seen: set = set()
    params = nbytes(engine.module.parameters(), seen)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    # gradients at the accumulation boundary, before the step: the module's, or ZeRO's partitions
    grads = nbytes((p.grad for p in engine.module.parameters()), seen)
    zero_grads = getattr(engine.optimizer, "averaged_gradients", None) or {}
    grads += nbytes((g for gs in zero_grads.values() for g in (gs or [])), seen)
    engine.step()
    grads += nbytes((p.grad for g in inner.param_groups for p in g["params"]), seen)
    optim = nbytes((p for g in inner.param_groups for p in g["params"]), seen)  # ZeRO's fp32 partitions
    optim += nbytes((v for s in inner.state.values() for v in s.values()), seen)
    engine.destroy()
    return {"params": params, "grads": grads, "optim": optim, "world": world}


def main() -> None:
    from megaxatl.config import load_config
    from megaxatl.train.engine import init_distributed

    out = Path(sys.argv[1])
    rank, world, _ = init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    for path in sys.argv[2:]:
        result = measure(load_config(path), rank, world)
        (out / f"{Path(path).stem}-rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
