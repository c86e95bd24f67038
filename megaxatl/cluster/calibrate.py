"""Measured activation bytes of one block: what autograd saves for backward in its forward.

    python -m megaxatl.cluster.calibrate --config C [--symbol M] [--batch 1 --seq-len 2048 --dtype bf16]

The planner's per-block formulas (cluster/activations.py) are held against this count by
tests/test_plan_calibration.py. Counted with torch.autograd.graph.saved_tensors_hooks: every
tensor an autograd node keeps, each distinct storage once (views and the same tensor saved by
several nodes are one allocation), parameters excluded (they are model state, not activations).
The block's input is counted: the block keeps it (its first norm saves it), and the planner
charges each block for its own input.

dtype: 'fp32', or 'bf16' as the trainer runs it: DeepSpeed's bf16 mode casts the whole module
to bf16 (no autocast), so weights and activations are bf16 and the fp32 work is the explicit
`.float()` inside norms, scans and gates. TP 1, on whatever device the tensors are given (the
kernel backends the dispatcher picks there: on CPU `cpu` / `torch`, see megaxatl.kernels).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class SavedTensors:
    """Distinct storages autograd saved, (shape, dtype, bytes) each, in the order first seen."""

    items: list[tuple[tuple[int, ...], torch.dtype, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(n for _, _, n in self.items)

    def summary(self, top: int = 12) -> str:
        rows = sorted(self.items, key=lambda r: -r[2])[:top]
        return "\n".join(f"{n / 2**20:10.2f} MiB  {str(d).removeprefix('torch.'):>9}  {tuple(s)}" for s, d, n in rows)


def saved_by(fn, *args, exclude=()) -> SavedTensors:
    """Run fn(*args) under saved-tensor hooks and return what autograd kept, without the
    storages of `exclude` (e.g. parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[tuple[int, int]] = set()
    out = SavedTensors()

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if st.nbytes() and st.data_ptr() not in skip and key not in seen:
            seen.add(key)
            out.items.append((tuple(t.shape), t.dtype, st.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args)
    del result
    return out


def block_saved(model_cfg, symbol: str, batch: int, seq_len: int, dtype: str, device="cpu",
                seed: int = 0) -> SavedTensors:
    """What one XATL block with `symbol`'s mixer saves for a (batch, seq_len) forward in `dtype`."""
    from dataclasses import replace

    from megaxatl.models.block import Block

    from megaxatl.config.pattern import MIXERS

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if symbol not in MIXERS:
        raise ValueError(f"unknown mixer symbol {symbol!r} (known: {''.join(MIXERS)})")
    torch.manual_seed(seed)
    cfg = replace(model_cfg, pattern=symbol, n_layers=1)
    block = Block(symbol, cfg).to(device=device, dtype=DTYPES[dtype])
    x = torch.randn(batch, seq_len, cfg.d_model, device=device, dtype=DTYPES[dtype], requires_grad=True)
    return saved_by(lambda t: block(t)[0], x, exclude=list(block.parameters()))


def main(argv=None) -> int:
    from megaxatl.config import load_config

    p = argparse.ArgumentParser(prog="python -m megaxatl.cluster.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--symbol", default=None, help="mixer symbol (default: the pattern's first)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's data.seq_len")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: the config's train.dtype")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    sym = a.symbol or cfg.model.layer_symbols[0]
    s, dtype = a.seq_len or cfg.data.seq_len, a.dtype or cfg.train.dtype
    from megaxatl.cluster.activations import block_activation_bytes

    got = block_saved(cfg.model, sym, a.batch, s, dtype)
    print(f"block '{sym}', {a.batch} x {s}, {dtype}, CPU: measured {got.bytes / 2**20:.1f} MiB")
    for backend in ("torch", "cuda"):
        est = block_activation_bytes(cfg.model, sym, a.batch, s, dtype, 1, backend)
        print(f"  planner, {backend} column: {est / 2**20:.1f} MiB ({est / got.bytes:.3f}x measured)")
    print(got.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
