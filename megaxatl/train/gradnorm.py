"""Which gradient elements count toward the global gradient norm, so that the norm (and clipping
by it) is the single-process one at any TP x PP x DP layout and ZeRO stage.

Under tensor parallelism a rank's tensor is made of parts that are counted differently
(checkpoint/sharded.local_chunks says which, from the parameter's TP rule):

    a shard of a split tensor             counted on every rank (the ranks hold disjoint parts)
    a replicated tensor (norms, biases)   counted on TP rank 0 only (every rank holds it whole)
    a copied unit (GQA KV heads or        counted on the lowest rank holding the copy: copies
    Mamba-2 groups fewer than ranks)      get summed gradients (parallel/comm.sync_unit_grads)
    the last pipeline stage's copy of     never (DeepSpeed marks it ds_pipe_replicated; stage 0
    a tied embedding                      counts the embedding)

A packed tensor (Mamba-2's in_proj: z, x split; B, C copied) mixes them, which is why the count is
per element range and not per parameter, and why DeepSpeed's own norm (per parameter: model-
parallel or not) over-counts copies.

Where the gradients are when the optimizer steps:

    ZeRO-0    the tensors AdamW steps hold their whole (TP-local) gradient: the module's
              parameters (fp32, ZeRO-0) or DeepSpeed's fp32 copies of them (bf16, ZeRO-0). Every
              DP replica holds the same gradient, so the world sum is divided by dp.
    ZeRO-1/2  each DP rank holds a slice of each param group's reduced gradient; a parameter's
              piece of it is DeepSpeed's gradient fragment (`_hp_mapping`, what safe_get_full_grad
              reads), there from the end of backward until the ZeRO optimizer's step turns it,
              group by group, into the flat fp32 gradient AdamW steps. DP slices are disjoint:
              the world sum is the norm. (The bf16 optimizer of pipeline stages keeps the whole
              gradient per parameter there; its slice is cut out.)

    ZeRO-3    each DP rank holds a contiguous slice of every parameter, flattened
              ([rank * n, rank * n + n) of it, n = the partition size); its reduced fp32 gradient
              is DeepSpeed's safe_get_local_grad, there until the ZeRO-3 step. Disjoint as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from megaxatl.checkpoint.sharded import Layout, local_chunks
from megaxatl.parallel.tp_rules import Replicate
from megaxatl.train import deepspeed_internals as dsi

Ranges = list[tuple[int, int]]


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def counted_ranges(name: str, p: torch.Tensor, layout: Layout, tp_rank: int, tp: int) -> Ranges:
    """Flat (row-major) element ranges of this rank's tensor `p` (global name `name`) that count
    (p's TP-local shape: ZeRO-3's ds_shape where it partitioned p away)."""
    shape = tuple(dsi.param_shape(p))
    numel = math.prod(shape)
    if dsi.is_pipe_replicated(p):
        return []
    rule = layout.rules[name]
    if isinstance(rule, Replicate) or tp == 1:
        return [(0, numel)] if tp_rank == 0 or tp == 1 else []
    chunks = local_chunks(name, rule, layout.shapes[name], tp_rank, tp)
    if all(c.owner for c in chunks):
        return [(0, numel)]
    d = chunks[0].dim
    inner, outer, size = math.prod(shape[d + 1:]), math.prod(shape[:d]), shape[d]
    return _merge([((o * size + c.local_offset) * inner, (o * size + c.local_offset + c.size) * inner)
                   for o in range(outer) for c in chunks if c.owner])


@dataclass
class NormPlan:
    """The counted gradient ranges of this rank, ready to sum."""
    parts: list[tuple[Callable[[], torch.Tensor | None], Ranges]]  # (reads a gradient, counted flat ranges)
    divisor: int  # DP replicas holding the same gradients (1 for ZeRO slices)
    # ZeRO-1/2 hand AdamW one group's gradients at a time, made from DeepSpeed's reduced
    # fragments group by group: the norm must be taken at the start of the ZeRO optimizer's step,
    # while every fragment is still there
    before_zero_step: bool = False

    def local_sq(self) -> torch.Tensor | None:
        """Sum of the squares of this rank's counted gradient elements (fp64 scalar on the
        gradients' device), None when it holds no gradient."""
        total = None
        for read, ranges in self.parts:
            g = read() if ranges else None
            if g is None:
                continue
            flat = g.reshape(-1)
            pieces = [flat] if ranges == [(0, flat.numel())] else [flat[a:b] for a, b in ranges]
            for piece in pieces:
                sq = piece.float().pow(2).sum().double()
                total = sq if total is None else total + sq
        return total


def _grad_of(t: torch.Tensor) -> Callable[[], torch.Tensor | None]:
    return lambda: t.grad


def _fragment_of(p: torch.Tensor, lo: int, n: int) -> Callable[[], torch.Tensor | None]:
    """DeepSpeed's reduced gradient of p's piece [lo, lo + n) in this DP rank's slice (what
    safe_get_full_grad reads): ZeRO-1/2 keep that piece only, the bf16 optimizer (pipeline
    stages in bf16) the parameter's whole gradient."""
    def read():
        g = dsi.fragment_grad(p)
        return g if g.numel() == n else g.reshape(-1).narrow(0, lo, n)
    return read


def _local_grad_of(p: torch.Tensor) -> Callable[[], torch.Tensor | None]:
    def read():
        from deepspeed.utils import safe_get_local_grad

        return safe_get_local_grad(p)
    return read


def _zero3_plan(named, layout: Layout, tp_rank: int, tp: int) -> NormPlan:
    parts = []
    for name, p in named:
        lo, hi = dsi.zero3_slice(p)  # this rank's slice of the flattened parameter
        ranges = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in counted_ranges(name, p, layout, tp_rank, tp)]
        parts.append((_local_grad_of(p), [(a, b) for a, b in ranges if a < b]))
    return NormPlan(parts, 1, before_zero_step=True)


def plan_norm(named, view, layout: Layout, tp_rank: int, tp: int, dp: int) -> NormPlan | None:
    """The plan for what DeepSpeed built (train/deepspeed_internals.OptimizerView); None for an optimizer
    wrapper the view does not know (e.g. FP16_Optimizer: DeepSpeed's fused Adam with bf16)."""
    if not view.known:
        return None
    if view.z3 is not None:
        return _zero3_plan(named, layout, tp_rank, tp)
    if view.flat is None:  # AdamW steps the module's parameters or DeepSpeed's fp32 copies of them
        return NormPlan([(_grad_of(view.hp_of(p)), counted_ranges(n, p, layout, tp_rank, tp)) for n, p in named], dp)
    parts = []
    for name, p in named:
        piece = dsi.fragment(p)
        if piece is None:  # no piece of p in this DP rank's slice
            continue
        lo, n = piece
        ranges = [(max(a, lo) - lo, min(b, lo + n) - lo) for a, b in counted_ranges(name, p, layout, tp_rank, tp)]
        parts.append((_fragment_of(p, lo, n), [(a, b) for a, b in ranges if a < b]))
    return NormPlan(parts, 1, before_zero_step=True)
