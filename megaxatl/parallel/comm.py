"""Collectives with autograd over an explicit TP process group (Megatron's mappings, no globals).

    copy_to(x)        forward identity,    backward all-reduce   (enter a column-parallel region)
    reduce_from(x)    forward all-reduce,  backward identity     (leave a row-parallel region into
                                                                  replicated computation)
    all_reduce_both(x) forward all-reduce, backward all-reduce   (a sum read by rank-local
                                                                  computation: Mamba-1's x_proj,
                                                                  group-norm statistics)
    gather_last(x)    forward all-gather on the last dim, backward keep this rank's slice
    sync_unit_grads(w, spec)  forward identity; backward sums the gradient of pieces that several
                      ranks hold as copies (replicated KV heads / Mamba-2 groups, replicated
                      parameters used by rank-local heads), so every copy gets the full gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, op=op, group=group)
    return x


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceBoth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.size = group, dist.get_rank(group), x.shape[-1]
        n = dist.get_world_size(group)
        if n == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(-1, ctx.rank * ctx.size, ctx.size).contiguous(), None


class _SyncUnitGrads(torch.autograd.Function):
    """spec: tuple of (dim, offset, size, units, unit) for each piece held as a copy: local rows
    [offset, offset + size) along `dim` are unit `unit` of `units`; units=1 means the whole piece is
    replicated on every rank. The gradient is scattered into a zero buffer of all units, summed
    over the group (adding zeros is exact) and read back, so copies of a unit add their parts."""

    @staticmethod
    def forward(ctx, w, spec, group):
        ctx.spec, ctx.group = spec, group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        if dist.get_world_size(ctx.group) == 1:
            return g, None, None
        g = g.clone()
        for dim, offset, size, units, unit in ctx.spec:
            local = g.narrow(dim, offset, size)
            shape = list(local.shape)
            shape[dim] = size * units
            buf = torch.zeros(shape, dtype=g.dtype, device=g.device)
            buf.narrow(dim, unit * size, size).copy_(local)
            dist.all_reduce(buf, group=ctx.group)
            local.copy_(buf.narrow(dim, unit * size, size))
        return g, None, None


def copy_to(x, group):
    return _CopyTo.apply(x, group)


def reduce_from(x, group):
    return _ReduceFrom.apply(x, group)


def all_reduce_both(x, group):
    return _AllReduceBoth.apply(x, group)


def gather_last(x, group):
    return _GatherLast.apply(x, group)


def sync_unit_grads(w, spec, group):
    return _SyncUnitGrads.apply(w, spec, group)
