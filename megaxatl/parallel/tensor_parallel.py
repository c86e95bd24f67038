"""apply_tensor_parallel(model, tp_group, sequence_parallel=False): turn a plain built LM into
this rank's TP shard.

torchtitan's order: the model is built whole (same seed on every rank, so a TP run starts from
exactly the TP=1 initialisation), then parallelised in place. Each parameter is cut by its rule
(tp_rules.py) keeping its name and Parameter object (markers such as no-decay / fp32 survive);
modules keep their own forward code with local sizes (heads, d_inner, groups), and only the
boundaries change, Megatron style:

    mixer / MLP input     copy_to (identity; backward all-reduce), once per mixer / MLP; a
                          mixer whose input feeds one column-parallel linear only (Mamba-1 /
                          Mamba-2 in_proj) enters through that linear instead: megatron-core's
                          matmul whose input-gradient all-reduce runs asynchronously, overlapping
                          the weight-gradient matmul (comm.column_linear)
    column-parallel       q/k/v/g, gate/up, dt_proj: plain local matmuls
    row-parallel out      o_proj / out_proj / down_proj: local matmul, all-reduce, + bias
    Mamba-1 x_proj        row-parallel; its (dt, B, C) sum feeds rank-local channels, so the
                          all-reduce is also an all-reduce in backward
    Mamba-2 gated norm    per group: local when whole groups sit on a rank, else the group's
                          sum of squares is summed across ranks
    copied pieces         KV heads / Mamba-2 groups fewer than ranks, GLA's shared gate input and
                          norm weight: the gradient of the copies is summed in the graph
    embedding / LM head   vocab-parallel; loss() uses a vocab-parallel cross entropy (no gather);
                          forward() / logits() gather the full logits (eval, generation)

Needs H % tp == 0 for every head-split mixer, d_inner % tp == 0, padded vocab % tp == 0, and for
KV heads / Mamba-2 groups either count % tp == 0 or tp % count == 0.

Sequence parallelism (Megatron's, sequence_parallel=True): outside the mixer / MLP regions
(embedding output, residual stream, norms, block boundaries, final norm) every rank holds only
L / tp positions (dim 1 of (B, L, D); L % tp == 0, else a ValueError from the forward), so those
activations and the norm work are not repeated on every rank. The boundaries become

    mixer / MLP input     gather_seq (all-gather the sequence; backward reduce-scatter): the
                          mixers (conv + scan, attention, retention, GLA) read the whole sequence
    row-parallel out      local matmul, reduce-scatter along the sequence, + bias
    embedding             vocab-parallel, reduce-scattered along the sequence
    LM head               gather_seq, then the vocab-parallel matmul (loss and logits as without)
    replicated params     norm weights / biases and the row-parallel output biases see this rank's
                          positions only: their gradient is summed over the group in the graph
                          (sync_unit_grads, as copied pieces), so the copies stay identical

A forward with a cache (generation: prefill, then one token at a time) runs without the split.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaxatl.models.attention import Attention
from megaxatl.models.gla import GLA
from megaxatl.models.lm import LM, RESIDUAL_OUT, TokenEmbedding, project_logits
from megaxatl.models.mamba import Mamba
from megaxatl.models.mamba2 import Mamba2
from megaxatl.models.mlp import MLP
from megaxatl.models.norms import GatedRMSNorm, LayerNorm, RMSNorm
from megaxatl.models.retention import Retention, retention_log_decay
from megaxatl.parallel.comm import (all_reduce_both, column_linear, copy_to, gather_last, gather_seq, reduce_from,
                                    reduce_scatter_seq, sync_unit_grads)
from megaxatl.parallel.tp_rules import Replicate, Shard, local_copied_pieces, model_rules, shard_tensor
from megaxatl.parallel.vocab_loss import vocab_parallel_cross_entropy


class SequenceParallel:
    """Whether the stream between regions is split along the sequence, shared by every module of
    one model. `active` is off without sequence parallelism, and while a cached forward runs:
    decoding feeds a token at a time, which cannot be split over the ranks."""

    def __init__(self, enabled: bool):
        self.enabled = self.active = enabled

    @contextmanager
    def paused(self):
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before


def check_sequence_split(seqlen: int, tp: int) -> None:
    if seqlen % tp:
        raise ValueError(f"sequence parallelism splits the sequence over the tp={tp} tensor-parallel ranks: "
                         f"sequence length L={seqlen} is not divisible by tp={tp} (use a multiple of {tp})")


# ---- TP module classes (swapped in with __class__, as FSDP2's fully_shard does) ---------------

class EntryColumnParallelLinear(nn.Linear):
    """weight (out / tp, in): the one consumer of its region's input, so it enters the region
    itself: y = x @ W_local^T + b_local, the input gradient all-reduced asynchronously in backward
    (the region's pre-hook then passes the input through). With the sequence split, the hook's
    gather_seq already sums the input gradient (reduce-scatter): a plain local matmul."""

    def forward(self, x):
        if self.tp_sp.active:
            return F.linear(x, self.weight, self.bias)
        return column_linear(x, self.weight, self.bias, self.tp_group)


class RowParallelLinear(nn.Linear):
    """weight (out, in / tp): y = all_reduce(x_local @ W_local^T) + b; b replicated. With sequence
    parallelism the sum is reduce-scattered along the sequence and b added to this rank's part."""

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = reduce_scatter_seq(y, self.tp_group) if self.tp_sp.active else reduce_from(y, self.tp_group)
        return y if self.bias is None else y + self.bias


class ReducedRowLinear(nn.Linear):
    """Row-parallel whose full output feeds rank-local computation (Mamba-1 x_proj -> dt, B, C)."""

    def forward(self, x):
        y = all_reduce_both(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(TokenEmbedding):
    """weight (V / tp, D) rows [vocab_start, vocab_start + V/tp); other ids read zeros, summed
    (reduce-scattered along the sequence with sequence parallelism); the embedding scale applies
    to each rank's rows before the sum."""

    def forward(self, ids):
        if self.tp_sp.active:  # the first op of a forward: fail here, naming L and tp
            check_sequence_split(ids.shape[1], dist.get_world_size(self.tp_group))
        n = self.weight.shape[0]
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + n)
        out = F.embedding((ids - self.vocab_start).masked_fill(outside, 0), self.weight)
        out = self.scaled(out.masked_fill(outside[..., None], 0.0))
        return reduce_scatter_seq(out, self.tp_group) if self.tp_sp.active else reduce_from(out, self.tp_group)


class TPRetention(Retention):
    def log_decay(self, device=None):
        # gamma depends on the head's global index
        full = retention_log_decay(self.tp_global_heads, self.decay_base, self.decay_span, device)
        return full[self.tp_head0: self.tp_head0 + self.n_heads]


class TPGatedRMSNorm(GatedRMSNorm):
    """A rank holds part of one group (fewer groups than ranks): the group's sum of squares is
    summed over the ranks sharing it (scattered into a (..., G) buffer, zeros elsewhere)."""

    def forward(self, y, z):
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        ss = F.pad(h.pow(2).sum(-1, keepdim=True), (self.tp_group_idx, self.tp_n_groups - 1 - self.tp_group_idx))
        ss = all_reduce_both(ss, self.tp_group).narrow(-1, self.tp_group_idx, 1)
        h = h * torch.rsqrt(ss / self.group_size + self.eps)
        return (h * self.weight.float()).to(dtype)


class _GradSyncMixin:
    """Reading a parameter named in `tp_sync` returns it through sync_unit_grads (parameters stay
    registered under their own names; nn.Module resolves them in __getattr__). Those also named in
    `tp_sync_sp` are summed only while the sequence is split: otherwise every rank already saw
    every position and holds the full gradient."""

    def __getattr__(self, name):
        value = super().__getattr__(name)
        d = self.__dict__
        spec = d.get("tp_sync", {}).get(name)
        if spec is None:
            return value
        sp = d.get("tp_sync_sp", {}).get(name)
        return value if sp is not None and not sp.active else sync_unit_grads(value, spec, d["tp_group"])


_SYNC_CLASSES: dict[type, type] = {}


def _swap(module: nn.Module, cls: type, **attrs) -> None:
    module.__class__ = cls
    module.__dict__.update(attrs)


def _add_grad_sync(module: nn.Module, leaf: str, spec, group, sp: SequenceParallel | None = None) -> None:
    cls = type(module)
    if not issubclass(cls, _GradSyncMixin):
        if cls not in _SYNC_CLASSES:
            _SYNC_CLASSES[cls] = type(f"GradSync{cls.__name__}", (_GradSyncMixin, cls), {})
        _swap(module, _SYNC_CLASSES[cls], tp_sync={}, tp_sync_sp={}, tp_group=group)
    module.tp_sync[leaf] = spec
    if sp is not None:
        module.tp_sync_sp[leaf] = sp


def head_logits(lm, hidden, weight):
    """This rank's logits (B, L, V_padded / tp) from the final-normed hidden: the LM head of
    TensorParallelLM and of a pipeline's last stage. Enters the vocab-parallel region (copy_to,
    or gather_seq when the hidden holds this rank's positions only); a plain LM's full logits."""
    if getattr(lm, "tp_size", 1) > 1:
        sp = getattr(lm, "tp_sp", None)
        hidden = gather_seq(hidden, lm.tp_group) if sp is not None and sp.active else copy_to(hidden, lm.tp_group)
    return project_logits(lm.cfg, hidden, weight)


class TensorParallelLM(LM):
    def forward(self, input_ids, cache=None, *args, **kwargs):
        if cache is None:
            return super().forward(input_ids, cache, *args, **kwargs)
        with self.tp_sp.paused():  # prefill and one-token steps: every rank runs every position
            return super().forward(input_ids, cache, *args, **kwargs)

    def hidden_states(self, input_ids, cache=None):
        """As LM's; with sequence parallelism (and no cache) the hidden holds this rank's L / tp
        positions, which logits() / local_logits() gather back."""
        if cache is not None and self.tp_sp.active:
            raise ValueError("a sequence-parallel model runs a cached forward only through forward(ids, cache) "
                             "(which runs without the sequence split), not hidden_states(ids, cache)")
        return super().hidden_states(input_ids, cache)

    def logits(self, hidden):
        """Full logits (gathered over the vocab shards, and the sequence), as the plain model's."""
        out = gather_last(self.local_logits(hidden), self.tp_group)
        return out[..., : self.cfg.vocab_size] if out.shape[-1] != self.cfg.vocab_size else out

    def local_logits(self, hidden):
        """(B, L, V_padded / tp): this rank's vocab shard of the logits, every position."""
        return head_logits(self, hidden, self.head_weight)

    def loss(self, input_ids, labels, ignore_index: int = -100):
        hidden, _ = self.hidden_states(input_ids)
        local = self.local_logits(hidden).float().flatten(0, 1)
        return vocab_parallel_cross_entropy(local, labels.flatten(), self.tp_vocab_start, self.cfg.vocab_size,
                                            self.tp_group, ignore_index)


# ---- apply -------------------------------------------------------------------------------------

def _split(name: str, count: int, tp: int, what: str) -> int:
    if count % tp:
        raise ValueError(f"tensor parallel {tp}: {name} has {count} {what}, not divisible")
    return count // tp


def _local_units(count: int, tp: int) -> int:
    return count // tp if count % tp == 0 else 1  # fewer than ranks: one copied unit per rank


def _enter(module: nn.Module, args):
    x, group = args[0], module.tp_group
    if module.tp_sp.active:
        return (gather_seq(x, group), *args[1:])
    if module.tp_entry_linear:  # its one column-parallel linear all-reduces the input gradient
        return args
    return (copy_to(x, group), *args[1:])


def _enter_region(module: nn.Module, group, sp: SequenceParallel, entry_linear: str | None = None) -> None:
    """entry_linear: the name of the ONE submodule (a column-parallel nn.Linear) that reads the
    region's input, which then enters the region through megatron-core's async matmul."""
    # the hook reads the module's own attributes, so a deep copy of the model follows its own copy
    module.__dict__.update(tp_group=group, tp_sp=sp, tp_entry_linear=entry_linear is not None)
    if entry_linear is not None:
        _swap(getattr(module, entry_linear), EntryColumnParallelLinear, tp_group=group, tp_sp=sp)
    module.register_forward_pre_hook(_enter)


def _sequence_replicated(model: LM, rules) -> set[str]:
    """Replicated parameters applied in the sequence-split stream, whose gradient on a rank covers
    its positions only: the block / final norms' weights and biases, and the biases added after a
    row-parallel output (the projections writing into the residual stream)."""
    modules = dict(model.named_modules())
    out = set()
    for name, rule in rules.items():
        if not isinstance(rule, Replicate) or rule.sync_grad:  # sync_grad: summed anyway
            continue
        owner, _, leaf = name.rpartition(".")
        row_out_bias = leaf == "bias" and owner.rpartition(".")[2] in RESIDUAL_OUT
        if isinstance(modules[owner], (RMSNorm, LayerNorm)) or row_out_bias:
            out.add(name)
        else:  # where a new replicated parameter is used decides whether its gradient needs the sum
            raise ValueError(f"sequence parallelism: replicated parameter '{name}' is neither a norm's nor a "
                             f"row-parallel output bias; tensor_parallel.py must say how its gradient is summed")
    return out


def _check_splittable(cfg, tp: int, sequence_parallel: bool) -> None:
    """What these TP regions cannot split (refused before anything changes)."""
    if tp > 1 and cfg.qk_norm == "full":
        # the statistics span every head, and the heads are split over the ranks
        raise ValueError("tensor parallelism: model.qk_norm 'full' (OLMo-2) normalises q / k over all heads at once, "
                         "which TP splits over ranks; use tp=1")
    if sequence_parallel and cfg.pos_embed:
        raise ValueError("sequence parallelism: the learned position embedding (model.pos_embed) is added before the "
                         "sequence split; use sequence_parallel false")


def apply_tensor_parallel(model: LM, tp_group, sequence_parallel: bool = False) -> LM:
    """Shard `model` (a plain LM, identical on every rank of `tp_group`) in place; returns it.
    sequence_parallel: split the activations between regions along the sequence (needs tp > 1)."""
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    if sequence_parallel and tp == 1:
        raise ValueError("sequence parallelism needs a tensor-parallel group of more than one rank (tp > 1)")
    rules = model_rules(model)  # raises on a parameter without a rule, before anything changes
    _check_splittable(model.cfg, tp, sequence_parallel)
    seq_replicated = _sequence_replicated(model, rules) if sequence_parallel else set()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    _split("the padded vocab", model.cfg.padded_vocab_size, tp, "rows")
    g, sp = tp_group, SequenceParallel(sequence_parallel)
    for name, m in model.named_modules():
        if isinstance(m, (Attention, Retention, GLA)):
            h, kv = m.n_heads, m.n_kv_heads
            m.n_heads, m.n_kv_heads = _split(name, h, tp, "heads"), _local_units(kv, tp)
            _swap(m.o_proj, RowParallelLinear, tp_group=g, tp_sp=sp)
            if isinstance(m, Retention):
                _swap(m, TPRetention, tp_global_heads=h, tp_head0=rank * m.n_heads)
            _enter_region(m, g, sp)
        elif isinstance(m, Mamba):
            m.d_inner = _split(name, m.d_inner, tp, "inner channels")
            m.fused_inner = tp == 1  # x_proj / out_proj all-reduce between the fused op's steps
            _swap(m.x_proj, ReducedRowLinear, tp_group=g)
            _swap(m.out_proj, RowParallelLinear, tp_group=g, tp_sp=sp)
            _enter_region(m, g, sp, entry_linear="in_proj")  # forward / _step read hidden by in_proj only
        elif isinstance(m, Mamba2):
            n_groups = m.n_groups
            m.n_heads = _split(name, m.n_heads, tp, "heads")
            m.d_inner = m.n_heads * m.head_dim
            m.n_groups = _local_units(n_groups, tp)
            m.conv_dim = m.d_inner + 2 * m.n_groups * m.d_state
            if n_groups % tp:  # a group spans ranks: its norm statistics too
                _swap(m.norm, TPGatedRMSNorm, tp_group=g, tp_n_groups=n_groups, tp_group_idx=rank * n_groups // tp)
            _swap(m.out_proj, RowParallelLinear, tp_group=g, tp_sp=sp)
            _enter_region(m, g, sp, entry_linear="in_proj")  # forward / _step read hidden by in_proj only
        elif isinstance(m, MLP):
            _swap(m.down_proj, RowParallelLinear, tp_group=g, tp_sp=sp)
            _enter_region(m, g, sp)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = shard_tensor(name, p.data, rules[name], rank, tp)
            # Megatron's marker, read by DeepSpeed's grad-norm / clipping so a shard counts on every
            # rank and a replicated tensor once (copied KV heads / groups still count per copy)
            p.tensor_model_parallel = isinstance(rules[name], Shard) and tp > 1
            if p.tensor_model_parallel:
                p.partition_dim, p.partition_stride = rules[name].dim, 1
            spec = local_copied_pieces(name, rules[name], shapes[name], rank, tp)
            if spec:
                owner, _, leaf = name.rpartition(".")
                _add_grad_sync(modules[owner], leaf, spec, g)
            elif name in seq_replicated:
                # applied to this rank's positions only: sum the partial gradients over the group
                # (in the graph, so it composes with accumulation and activation checkpointing)
                owner, _, leaf = name.rpartition(".")
                _add_grad_sync(modules[owner], leaf, ((0, 0, shapes[name][0], 1, 0),), g, sp)
    _swap(model.embed, VocabParallelEmbedding, tp_group=g, tp_sp=sp, vocab_start=rank * model.embed.weight.shape[0])
    _swap(model, TensorParallelLM, tp_group=g, tp_size=tp, tp_rank=rank, tp_rules=rules, tp_sp=sp,
          tp_vocab_start=rank * model.embed.weight.shape[0])
    return model
