"""Collectives with autograd over an explicit TP process group (Megatron's mappings, no globals).

megatron-core carries the pieces of its tensor-parallel code that take an explicit process group
and run on CPU (gloo) as on CUDA (NCCL): the region mappings copy_to / reduce_from and the
column-parallel matmul with its asynchronous input-gradient all-reduce (column_linear). The rest
is ours, each for a measured reason (megatron-core 0.16.1, torch 2.13 CPU, 2 gloo ranks):
megatron's gathers and reduce-scatters (gather_from_tensor_model_parallel_region and the
sequence-parallel mappings) allocate their output with ``device=torch.cuda.current_device()``, an
AssertionError on a CPU build, and the sequence-parallel ones split dim 0 ([s, b, h]) where our
activations are (B, L, D); it has no all-reduce-both-ways mapping.

    copy_to(x)        forward identity,    backward all-reduce   (enter a column-parallel region)
                      [megatron-core]
    reduce_from(x)    forward all-reduce,  backward identity     (leave a row-parallel region into
                      [megatron-core]                             replicated computation)
    column_linear(x, w, b)  x @ w^T + b; backward: the input gradient's all-reduce is launched
                      [megatron-core]     asynchronously and overlaps the weight-gradient matmul
                      (enter a region whose input feeds ONE column-parallel linear, in place of
                      copy_to + a plain matmul)
    all_reduce_both(x) forward all-reduce, backward all-reduce   (a sum read by rank-local
                                                                  computation: Mamba-1's x_proj,
                                                                  group-norm statistics)
    gather_last(x)    forward all-gather on the last dim, backward keep this rank's slice
    gather_seq(x)     forward all-gather along the sequence (dim 1), backward reduce-scatter
                      (sequence parallelism: enter a mixer / MLP / LM head region from the
                      sequence-split residual stream; every rank's region read every position)
    reduce_scatter_seq(x) forward reduce-scatter along the sequence (dim 1), backward all-gather
                      (sequence parallelism: leave a row-parallel region, or the vocab-parallel
                      embedding, into the sequence-split stream)
    sync_unit_grads(w, spec)  forward identity; backward sums the gradient of pieces that several
                      ranks hold as copies (replicated KV heads / Mamba-2 groups, replicated
                      parameters used by rank-local heads, and with sequence parallelism the norm
                      weights / row-parallel biases applied to this rank's positions only), so
                      every copy gets the full gradient.

megatron's mappings all-reduce IN PLACE on ``x.contiguous()`` (no clone): fed a non-contiguous
tensor they would reduce a copy and return the unreduced input, so every call here hands them a
contiguous one (_Contiguous below for the gradient copy_to receives).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.distributed as dist


@functools.cache
def mcore():
    """megatron.core.tensor_parallel, imported on first use (~4 s, so only a TP run pays it)."""
    with warnings.catch_warnings():  # it warns about optional Apex / Transformer Engine at import
        warnings.simplefilter("ignore")
        from megatron.core import tensor_parallel
    return tensor_parallel


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, op=op, group=group)
    return x


class _Contiguous(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (for megatron's in-place reduce)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


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


def _seq_part(x: torch.Tensor, n: int) -> int:
    seqlen = x.shape[1]
    if seqlen % n:
        raise ValueError(f"sequence parallelism: sequence length L={seqlen} (dim 1) is not divisible by the "
                         f"tensor-parallel size tp={n}")
    return seqlen // n


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


# gloo (CPU) only has reduce_scatter in recent torch; set once an older one refused it
_GLOO_LACKS_REDUCE_SCATTER = False


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    global _GLOO_LACKS_REDUCE_SCATTER
    n = dist.get_world_size(group)
    if n == 1:
        return x
    part = _seq_part(x, n)
    gloo = dist.get_backend(group) == "gloo"
    if not (gloo and _GLOO_LACKS_REDUCE_SCATTER):
        chunks = [c.contiguous() for c in x.split(part, dim=1)]
        out = torch.empty_like(chunks[0])
        try:
            dist.reduce_scatter(out, chunks, group=group)
            return out
        except RuntimeError:  # an unsupported op is refused before any communication, on every rank
            if not gloo:
                raise
            _GLOO_LACKS_REDUCE_SCATTER = True
    # sum everything and keep this rank's positions: the same values, more traffic
    return _all_reduce(x, group).narrow(1, dist.get_rank(group) * part, part).contiguous()


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        # every rank's region used all positions: sum their gradients, keep this rank's positions
        return _reduce_scatter_seq(g, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        # each rank's partial sum fed every position of the output: it gets the whole gradient
        return _all_gather_seq(g, ctx.group), None


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
    if dist.get_world_size(group) == 1:
        return x
    return _Contiguous.apply(mcore().copy_to_tensor_model_parallel_region(x, group=group))


def reduce_from(x, group):
    if dist.get_world_size(group) == 1:
        return x
    return mcore().reduce_from_tensor_model_parallel_region(x.contiguous(), group=group)


def column_linear(x, weight, bias, group):
    """Column-parallel matmul entering a region (megatron's ColumnParallelLinear core, its
    allreduce_dgrad path): forward a local matmul, backward the input gradient all-reduced over
    `group` asynchronously while the weight gradient is computed. A frozen weight takes megatron's
    frozen-weight variant (same forward and input gradient, no weight gradient)."""
    if dist.get_world_size(group) == 1:
        return torch.nn.functional.linear(x, weight, bias)
    tpl = mcore()
    if x.device.type == "cpu":  # its CUDA_DEVICE_MAX_CONNECTIONS=1 advice is about CUDA streams
        tpl.linear_with_grad_accumulation_and_async_allreduce.warned = True
    if not weight.requires_grad:
        return tpl.linear_with_frozen_weight(x, weight, bias, False, True, False, group)
    return tpl.linear_with_grad_accumulation_and_async_allreduce(
        x, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=True,
        sequence_parallel=False, tp_group=group)


def all_reduce_both(x, group):
    return _AllReduceBoth.apply(x, group)


def gather_last(x, group):
    return _GatherLast.apply(x, group)


def gather_seq(x, group):
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x, group):
    return _ReduceScatterSeq.apply(x, group)


def sync_unit_grads(w, spec, group):
    return _SyncUnitGrads.apply(w, spec, group)
