"""Tensor-parallel rules: one table per module type, naming each parameter's split (Megatron-core
style), read alike by apply_tensor_parallel, a checkpoint resharder and the tests.

    Replicate()                 every rank holds the whole tensor (norms, biases added after a
                                row-parallel all-reduce). sync_grad=True when every rank uses it
                                for its own heads only, so its gradient is a sum over ranks
                                (GLA's low-rank gate input and per-head norm weight).
    Shard(dim)                  split into tp equal contiguous parts along `dim`.
    Shard(dim, pieces=(..), units=(..))
                                the tensor packs sub-partitions along `dim` (global sizes
                                `pieces`, e.g. Mamba-1 in_proj [x, z]); each piece is split on its
                                own and the rank's parts are concatenated, so the global (canonical)
                                layout never depends on TP. `units` counts the heads / groups of
                                each piece (default: its size, i.e. any channel split): with
                                units % tp == 0 a piece splits by whole units; with fewer units
                                than ranks (tp % units == 0: GQA KV heads, Mamba-2 groups) rank r
                                holds a copy of unit r * units // tp, the one its heads read.

Canonical keys are the plain model's parameter names; rules are computed on a plain (unsharded)
model (built on the meta device is enough) and never depend on the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from megaxatl.models.attention import Attention
from megaxatl.models.gla import GLA
from megaxatl.models.lm import LM
from megaxatl.models.mamba import Mamba
from megaxatl.models.mamba2 import Mamba2
from megaxatl.models.mlp import MLP
from megaxatl.models.norms import LayerNorm, RMSNorm
from megaxatl.models.retention import Retention


@dataclass(frozen=True)
class Replicate:
    sync_grad: bool = False


@dataclass(frozen=True)
class Shard:
    dim: int
    pieces: tuple[int, ...] | None = None
    units: tuple[int, ...] | None = None


Rule = Replicate | Shard
COLUMN, ROW, REPLICATED = Shard(0), Shard(1), Replicate()


# ---- the tables: module type -> {local parameter name: rule} -----------------------------------

def _heads(H: int, KV: int) -> dict[str, Rule]:
    """q/k/v column-parallel by heads (KV heads split, or copied when fewer than ranks), o row."""
    q, kv = Shard(0, units=(H,)), Shard(0, units=(KV,))
    return {"q_proj.weight": q, "q_proj.bias": q, "k_proj.weight": kv, "k_proj.bias": kv,
            "v_proj.weight": kv, "v_proj.bias": kv, "o_proj.weight": Shard(1, units=(H,)),
            "o_proj.bias": REPLICATED}


def attention_rules(m: Attention) -> dict[str, Rule]:
    """A per-head q/k norm (one (hd,) weight for all heads) serves every rank's heads: replicated,
    gradients summed; a norm over the whole projection follows its heads (tensor_parallel.py
    refuses to split its statistics)."""
    if m.qk_norm == "full":
        norms = {"q_norm.weight": Shard(0, units=(m.n_heads,)), "k_norm.weight": Shard(0, units=(m.n_kv_heads,))}
        norms |= {"q_norm.bias": norms["q_norm.weight"], "k_norm.bias": norms["k_norm.weight"]}
    else:
        shared = Replicate(sync_grad=True)
        norms = {f"{n}_norm.{kind}": shared for n in "qk" for kind in ("weight", "bias")}
    return {**_heads(m.n_heads, m.n_kv_heads), **norms}


def retention_rules(m: Retention) -> dict[str, Rule]:
    return {**_heads(m.n_heads, m.n_kv_heads), "g_proj.weight": Shard(0, units=(m.n_heads,))}


def gla_rules(m: GLA) -> dict[str, Rule]:
    kv = Shard(0, units=(m.n_kv_heads,))
    return {**_heads(m.n_heads, m.n_kv_heads), "g_proj.weight": Shard(0, units=(m.n_heads,)),
            "gk_proj.0.weight": Replicate(sync_grad=True), "gk_proj.1.weight": kv, "gk_proj.1.bias": kv,
            "g_norm.weight": Replicate(sync_grad=True)}


def mamba_rules(m: Mamba) -> dict[str, Rule]:
    """Everything on d_inner channels; x_proj (dt_rank + 2N, d_inner) row-parallel (its output is
    all-reduced); dt_proj (d_inner, dt_rank) column; in_proj packs [x, z]."""
    xz = Shard(0, pieces=(m.d_inner, m.d_inner))
    return {"in_proj.weight": xz, "in_proj.bias": xz, "conv1d.weight": COLUMN, "conv1d.bias": COLUMN,
            "x_proj.weight": ROW, "dt_proj.weight": COLUMN, "dt_proj.bias": COLUMN, "A_log": COLUMN,
            "D": COLUMN, "out_proj.weight": ROW, "out_proj.bias": REPLICATED}


def mamba2_rules(m: Mamba2) -> dict[str, Rule]:
    """in_proj packs [z, x, B, C, dt] and conv1d [x, B, C]: z, x, dt and the per-head vectors split
    by heads, B and C by groups (copied when fewer groups than ranks). The gated norm's groups
    follow (whole groups per rank, or statistics summed across ranks when a group spans ranks)."""
    d, gn, H, G = m.d_inner, m.n_groups * m.d_state, m.n_heads, m.n_groups
    zxbcdt = Shard(0, pieces=(d, d, gn, gn, H), units=(H, H, G, G, H))
    xbc = Shard(0, pieces=(d, gn, gn), units=(H, G, G))
    head = Shard(0, units=(H,))
    return {"in_proj.weight": zxbcdt, "in_proj.bias": zxbcdt, "conv1d.weight": xbc, "conv1d.bias": xbc,
            "dt_bias": head, "A_log": head, "D": head, "norm.weight": head,
            "out_proj.weight": Shard(1, units=(H,)), "out_proj.bias": REPLICATED}


def mlp_rules(m: MLP) -> dict[str, Rule]:
    return {"gate_proj.weight": COLUMN, "gate_proj.bias": COLUMN, "up_proj.weight": COLUMN,
            "up_proj.bias": COLUMN, "down_proj.weight": ROW, "down_proj.bias": REPLICATED}


def norm_rules(m: nn.Module) -> dict[str, Rule]:
    return {"weight": REPLICATED, "bias": REPLICATED}


def lm_rules(m: LM) -> dict[str, Rule]:
    """Vocab-parallel embedding and LM head (padded vocab rows split on dim 0); the learned position
    embedding is added to the whole (replicated) stream."""
    return {"embed.weight": COLUMN, "lm_head.weight": COLUMN, "pos_embed.weight": REPLICATED}


TABLES: dict[type, Callable[[nn.Module], dict[str, Rule]]] = {
    LM: lm_rules, Attention: attention_rules, Retention: retention_rules, GLA: gla_rules,
    Mamba: mamba_rules, Mamba2: mamba2_rules, MLP: mlp_rules, RMSNorm: norm_rules, LayerNorm: norm_rules,
}


def _table_for(module: nn.Module):
    for cls in type(module).__mro__:  # subclasses (a TP class swap) read their base's table
        if cls in TABLES:
            return TABLES[cls]
    return None


def model_rules(model: nn.Module) -> dict[str, Rule]:
    """{canonical parameter name: rule} for a plain model; KeyError naming any parameter no table
    covers (a new parameter must get a rule before TP can run)."""
    if getattr(model, "tp_size", 1) != 1:
        raise ValueError("model_rules reads a plain model; this one is already tensor-parallel (use model.tp_rules)")
    params = dict(model.named_parameters())
    rules: dict[str, Rule] = {}
    by_owner: set[str] = set()  # set by an enclosing module's table (an attention's q/k norm)
    for prefix, module in model.named_modules():  # parents before their submodules
        table = _table_for(module)
        if table is None:
            continue
        for local, rule in table(module).items():
            name = f"{prefix}.{local}" if prefix else local
            if name not in params or name in by_owner:
                continue
            if name in rules and rules[name] != rule:
                raise ValueError(f"parameter '{name}' has two TP rules: {rules[name]} and {rule}")
            rules[name] = rule
            if "." in local:  # a submodule's parameter: its owner's table decides
                by_owner.add(name)
    missing = [n for n in params if n not in rules]
    if missing:
        raise KeyError(f"no tensor-parallel rule for parameter(s) {missing}: add them to megaxatl/parallel/tp_rules.py")
    return rules


# ---- pure shard / unshard ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Piece:
    size: int  # global size along the dim
    units: int
    split: bool  # True: split by units across ranks; False: rank r holds a copy of one unit


def _pieces(name: str, rule: Shard, global_size: int | None, local_size: int | None, tp: int) -> list[_Piece]:
    sizes = rule.pieces
    if sizes is None:
        units = rule.units[0] if rule.units else None
        if global_size is None:  # infer from a shard
            if units is None or units % tp == 0:
                global_size = local_size * tp
            else:
                global_size = local_size * units
        sizes = (global_size,)
    elif global_size is not None and sum(sizes) != global_size:
        raise ValueError(f"'{name}': pieces {sizes} do not add up to dim {rule.dim} size {global_size}")
    units = rule.units or tuple(sizes)
    out = []
    for size, u in zip(sizes, units):
        if size % u:
            raise ValueError(f"'{name}': piece of {size} does not hold {u} whole units")
        if u % tp == 0:
            out.append(_Piece(size, u, True))
        elif tp % u == 0:
            out.append(_Piece(size, u, False))
        else:
            raise ValueError(f"'{name}': {u} heads/groups cannot be split over TP {tp} (need one to divide the other)")
    return out


def _local_part(p: _Piece, rank: int, tp: int) -> tuple[int, int]:
    """(offset, size) of rank's part within the global piece."""
    if p.split:
        n = p.size // tp
        return rank * n, n
    n = p.size // p.units
    return (rank * p.units // tp) * n, n


def shard_tensor(name: str, full: torch.Tensor, rule: Rule, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The part of the global tensor `full` that rank `tp_rank` of `tp_size` holds (a new tensor)."""
    if isinstance(rule, Replicate):
        return full.clone()
    off, parts = 0, []
    for p in _pieces(name, rule, full.shape[rule.dim], None, tp_size):
        o, n = _local_part(p, tp_rank, tp_size)
        parts.append(full.narrow(rule.dim, off + o, n))
        off += p.size
    return torch.cat(parts, dim=rule.dim).contiguous()


def unshard(name: str, shards: list[torch.Tensor], rule: Rule) -> torch.Tensor:
    """The global tensor from every rank's shard (rank order). Copies must agree bit for bit."""
    tp = len(shards)
    if isinstance(rule, Replicate):
        for r, s in enumerate(shards[1:], 1):
            if not torch.equal(s, shards[0]):
                raise ValueError(f"'{name}': replicated copies on TP ranks 0 and {r} differ")
        return shards[0].clone()
    pieces = _pieces(name, rule, None, shards[0].shape[rule.dim], tp)
    out, local_off = [], 0
    for p in pieces:
        n = _local_part(p, 0, tp)[1]
        if p.split:
            out += [s.narrow(rule.dim, local_off, n) for s in shards]
        else:
            for u in range(p.units):
                copies = [s.narrow(rule.dim, local_off, n) for r, s in enumerate(shards) if r * p.units // tp == u]
                for c in copies[1:]:
                    if not torch.equal(c, copies[0]):
                        raise ValueError(f"'{name}': copies of unit {u} on different TP ranks differ")
                out.append(copies[0])
        local_off += n
    if any(s.shape[rule.dim] != local_off for s in shards):
        raise ValueError(f"'{name}': shard sizes {[tuple(s.shape) for s in shards]} do not match rule {rule}")
    return torch.cat(out, dim=rule.dim).contiguous()


def local_copied_pieces(name: str, rule: Rule, global_shape: Iterable[int], tp_rank: int, tp_size: int):
    """Pieces this rank holds as copies shared with other ranks, whose gradients must be summed over
    the TP group: tuple of (dim, local offset, size, units, unit) (see comm.sync_unit_grads)."""
    global_shape = tuple(global_shape)
    if isinstance(rule, Replicate):
        return ((0, 0, global_shape[0], 1, 0),) if rule.sync_grad and tp_size > 1 else ()
    out, local_off = [], 0
    for p in _pieces(name, rule, global_shape[rule.dim], None, tp_size):
        o, n = _local_part(p, tp_rank, tp_size)
        if not p.split and tp_size > 1:
            out.append((rule.dim, local_off, n, p.units, o // n))
        local_off += n
    return tuple(out)


def shard_state_dict(state: dict[str, torch.Tensor], rules: dict[str, Rule], tp_rank: int, tp_size: int) -> dict:
    """A canonical (global) state dict -> this rank's shard, same keys; KeyError on a key without a rule."""
    return {k: shard_tensor(k, v, rules[k], tp_rank, tp_size) for k, v in state.items()}


def unshard_state_dicts(states: list[dict[str, torch.Tensor]], rules: dict[str, Rule]) -> dict:
    """Every rank's shard (rank order) -> the canonical state dict."""
    keys = list(states[0])
    for r, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise KeyError(f"TP rank {r} holds keys different from rank 0's")
    return {k: unshard(k, [s[k] for s in states], rules[k]) for k in keys}
