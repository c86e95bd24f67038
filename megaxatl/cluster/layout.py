"""The TP x PP x DP layout of a job: which splits a model allows and how a world of ranks divides.

    python -m megaxatl.cluster.layout --config C --nodes N --gpus-per-node G [--tp T --pp P] [--shell]

prints `layout: TP 2 x PP 1 x DP 16 = 32 ranks (4 nodes x 8 GPUs)` (or `TP=2 PP=1 DP=16
WORLD_SIZE=32` with --shell, for `eval` in a job script) and exits 2 with one line naming the
problem when the layout cannot work. TP and PP come from the config's `parallel` section unless
given. Rules (the same ones the planner enumerates with):

- TP is a power of 2 that divides the padded vocabulary (vocab-parallel embedding / head), the
  attention heads and KV heads (when the pattern has attention; KV heads may instead be
  replicated when tp is a multiple of them), Mamba-1's d_inner, Mamba-2's, retention's and GLA's
  heads, and d_mlp; TP ranks
  stay inside a node (tp <= GPUs per node and divides it): TP all-reduces every layer.
- PP divides n_layers (equal stages).
- DP = world / (TP x PP), which must be whole.

No torch import: job templates call this before every launch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from megaxatl.config.pattern import ATTENTION_SYMBOLS


MIXER_NAMES = {"R": "retention", "G": "GLA"}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        return (f"TP {self.tp} x PP {self.pp} x DP {self.dp} = {self.world} ranks "
                f"({self.nodes} node{'s' if self.nodes != 1 else ''} x {self.gpus_per_node} GPUs)")

    def shell(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp} WORLD_SIZE={self.world}"


def tp_problem(model, tp: int) -> str | None:
    """Why `tp` cannot split `model` (a ModelConfig), or None."""
    if tp < 1 or tp & (tp - 1):
        return f"tp {tp} is not a power of 2"
    if model.padded_vocab_size % tp:
        return f"tp {tp} does not divide the padded vocab {model.padded_vocab_size}"
    symbols = model.layer_symbols
    if any(s in ATTENTION_SYMBOLS for s in symbols):
        if model.n_heads % tp:
            return f"tp {tp} does not divide {model.n_heads} attention heads"
        if model.kv_heads % tp and tp % model.kv_heads:
            return f"tp {tp} does not split {model.kv_heads} KV heads"
    if "M" in symbols and int(model.mamba.expand * model.d_model) % tp:
        return f"tp {tp} does not divide Mamba d_inner {int(model.mamba.expand * model.d_model)}"
    if "S" in symbols:
        heads = int(model.mamba2.expand * model.d_model) // model.mamba2.head_dim
        if heads % tp:
            return f"tp {tp} does not divide {heads} Mamba-2 heads"
    for sym, sub in (("R", getattr(model, "retention", None)), ("G", getattr(model, "gla", None))):
        if sym in symbols and sub is not None and (sub.n_heads or model.n_heads) % tp:
            return f"tp {tp} does not divide {sub.n_heads or model.n_heads} {MIXER_NAMES[sym]} heads"
    if model.mlp != "none" and model.d_mlp % tp:
        return f"tp {tp} does not divide d_mlp {model.d_mlp}"
    return None


def valid_tp(model, limit: int) -> list[int]:
    out, t = [], 1
    while t <= limit:
        if tp_problem(model, t) is None:
            out.append(t)
        t *= 2
    return out


def valid_pp(model, limit: int) -> list[int]:
    return [p for p in range(1, min(limit, model.n_layers) + 1) if model.n_layers % p == 0]


def resolve(cfg, nodes: int, gpus_per_node: int, tp: int | None = None, pp: int | None = None) -> Layout:
    """-> the Layout, or ValueError saying why this split does not fit."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"need nodes >= 1 and GPUs per node >= 1, got {nodes} and {gpus_per_node}")
    tp = tp or cfg.parallel.tp
    pp = pp or cfg.parallel.pp
    world = nodes * gpus_per_node
    why = tp_problem(cfg.model, tp)
    if why:
        raise ValueError(why)
    if tp > gpus_per_node or gpus_per_node % tp:
        raise ValueError(f"tp {tp} must divide the {gpus_per_node} GPUs of a node (TP stays inside a node)")
    if cfg.model.n_layers % pp:
        raise ValueError(f"pp {pp} does not divide n_layers {cfg.model.n_layers}")
    if world % (tp * pp):
        raise ValueError(f"{world} ranks are not a multiple of tp x pp = {tp * pp}")
    return Layout(tp, pp, world // (tp * pp), nodes, gpus_per_node)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megaxatl.cluster.layout", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--tp", type=int, default=None, help="default: the config's parallel.tp")
    p.add_argument("--pp", type=int, default=None, help="default: the config's parallel.pp")
    p.add_argument("--shell", action="store_true", help="print KEY=VALUE words for eval")
    args = p.parse_args(argv)
    from megaxatl.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
        lay = resolve(cfg, args.nodes, args.gpus_per_node, args.tp, args.pp)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"layout: error: {args.config}: {e}" if not isinstance(e, ConfigError) else f"layout: error: {e}",
              file=sys.stderr)
        return 2
    print(lay.shell() if args.shell else f"layout: {lay.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
