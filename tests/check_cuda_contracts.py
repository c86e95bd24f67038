"""Run by tests/test_kernels_contracts.py in a fresh process: every mixer of every shipped config
(plus a GLA variant of tiny_hybrid: no shipped config has 'G') at TP 1 / 2 / 4 / 8 where the config
divides, its real training forward on CPU with every dispatched call's arguments checked as the
external GPU kernel (causal-conv1d, mamba-ssm, fla) checks them (megaxatl.kernels.testing.cuda_contracts).

The TP ranks are simulated in this one process with torch's fake process group (collectives
return at once, leaving values wrong but every shape, stride and dtype what a real rank sees), the
model is built on the meta device and only one block per mixer kind gets storage (the trainer's
own meta build, TP cut and materialisation, train/init.py), at the config's widths and dtype, on a
short sequence whose length is the training seq_len modulo 8 plus 8 (what the stride checks read).
Prints one JSON line per (config, tp): status ok / skip (with why) / fail (with the error).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megaxatl.checkpoint.sharded import check_layout
from megaxatl.config import ConfigError, config_from_dict, config_to_dict, load_config
from megaxatl.kernels.testing import cuda_contracts
from megaxatl.models import build
from megaxatl.train.init import materialize

REPO = Path(__file__).resolve().parent.parent
TPS = (1, 2, 4, 8)
MIXERS = "MSRG"  # the pattern symbols whose mixers call kernel ops (attention calls none)


def configs() -> dict[str, dict]:
    out = {p.name: config_to_dict(load_config(p)) for p in sorted((REPO / "configs").glob("*.json"))}
    gla = json.loads(json.dumps(out["tiny_hybrid.json"]))
    gla["model"]["pattern"] = "G*SG"
    out["tiny_hybrid.json with G"] = gla
    return out


def one_case(data: dict, tp: int) -> dict:
    data = json.loads(json.dumps(data))
    data["parallel"].update(tp=tp, pp=1, sequence_parallel=False)
    # the training objective is not what is checked here (the mixers' kernels are): a config's
    # distillation section has its own layout checks (tests/test_train_distill.py)
    data.get("train", {}).pop("distill", None)
    try:
        cfg = config_from_dict(data)
        layout = check_layout(cfg.model, tp, 1)
    except (ConfigError, ValueError) as e:
        return {"status": "skip", "note": str(e).splitlines()[0][:200]}
    symbols = cfg.model.layer_symbols
    layers = {s: symbols.index(s) for s in MIXERS if s in symbols}
    rank = tp - 1  # the last rank: its slices start past the others' (any rank has the same widths)
    par = SimpleNamespace(tp=tp, pp=1, tp_rank=rank, pp_rank=0)
    with torch.device("meta"):
        lm = build(cfg)
    if tp > 1:
        from megaxatl.parallel import apply_tensor_parallel

        apply_tensor_parallel(lm, dist.new_group(list(range(tp))))
    names = {n for n in layout.shapes if any(n.startswith(f"layers.{i}.") for i in layers.values())}
    # values do not matter to the checks (only layouts, strides, dtypes): a constant is ~5x faster
    # to fill than the per-unit init at billions of parameters
    materialize(lm, names, layout, par, lambda loc, lay, pr: [p.data.fill_(0.01) for p in loc.values()])
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    seqlen = 8 + cfg.data.seq_len % 8
    checked, widths = {}, {}
    for symbol, i in layers.items():
        mixer = lm.layers[i].mixer.to(dtype)  # as DeepSpeed's bf16 engine casts the parameters
        hidden = torch.randn(1, seqlen, cfg.model.d_model, dtype=dtype, requires_grad=True)
        with cuda_contracts() as calls:
            mixer(hidden)
        checked[symbol] = dict(calls)
        if hasattr(mixer, "in_proj"):
            widths[symbol] = mixer.in_proj.weight.shape[0]  # the local row width the conv input is cut from
    return {"status": "ok", "checked": checked, "in_proj_rows": widths}


def main() -> int:
    torch.manual_seed(0)
    failed = 0
    cases = configs()
    for tp in TPS:
        dist.init_process_group("fake", rank=tp - 1, world_size=tp, store=FakeStore())
        try:
            for name, data in cases.items():
                try:
                    row = one_case(data, tp)
                except Exception as e:  # report every case, then fail
                    traceback.print_exc(file=sys.stderr)
                    row = {"status": "fail", "note": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    failed += 1
                print(json.dumps({"config": name, "tp": tp, **row}), flush=True)
        finally:
            dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
