"""apply_tensor_parallel(model, tp_group): turn a plain built LM into this rank's TP shard.

torchtitan's order: the model is built whole (same seed on every rank, so a TP run starts from
exactly the TP=1 initialisation), then parallelised in place. Each parameter is cut by its rule
(tp_rules.py) keeping its name and Parameter object (markers such as no-decay / fp32 survive);
modules keep their own forward code with local sizes (heads, d_inner, groups), and only the
boundaries change, Megatron style:

    mixer / MLP input     copy_to (identity; backward all-reduce), once per mixer / MLP
    column-parallel       q/k/v/g, in_proj, gate/up, dt_proj: plain local matmuls
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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaxatl.models.attention import Attention
from megaxatl.models.gla import GLA
from megaxatl.models.lm import LM
from megaxatl.models.mamba import Mamba
from megaxatl.models.mamba2 import Mamba2
from megaxatl.models.mlp import MLP
from megaxatl.models.norms import GatedRMSNorm
from megaxatl.models.retention import Retention, retention_log_decay
from megaxatl.parallel.comm import all_reduce_both, copy_to, gather_last, reduce_from, sync_unit_grads
from megaxatl.parallel.tp_rules import Shard, local_copied_pieces, model_rules, shard_tensor


# ---- TP module classes (swapped in with __class__, as FSDP2's fully_shard does) ---------------

class RowParallelLinear(nn.Linear):
    """weight (out, in / tp): y = all_reduce(x_local @ W_local^T) + b; b replicated."""

    def forward(self, x):
        y = reduce_from(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class ReducedRowLinear(nn.Linear):
    """Row-parallel whose full output feeds rank-local computation (Mamba-1 x_proj -> dt, B, C)."""

    def forward(self, x):
        y = all_reduce_both(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """weight (V / tp, D) rows [vocab_start, vocab_start + V/tp); other ids read zeros, summed."""

    def forward(self, ids):
        n = self.weight.shape[0]
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + n)
        out = F.embedding((ids - self.vocab_start).masked_fill(outside, 0), self.weight)
        return reduce_from(out.masked_fill(outside[..., None], 0.0), self.tp_group)


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
    registered under their own names; nn.Module resolves them in __getattr__)."""

    def __getattr__(self, name):
        value = super().__getattr__(name)
        spec = self.__dict__.get("tp_sync", {}).get(name)
        return value if spec is None else sync_unit_grads(value, spec, self.__dict__["tp_group"])


_SYNC_CLASSES: dict[type, type] = {}


def _swap(module: nn.Module, cls: type, **attrs) -> None:
    module.__class__ = cls
    module.__dict__.update(attrs)


def _add_grad_sync(module: nn.Module, leaf: str, spec, group) -> None:
    cls = type(module)
    if not issubclass(cls, _GradSyncMixin):
        if cls not in _SYNC_CLASSES:
            _SYNC_CLASSES[cls] = type(f"GradSync{cls.__name__}", (_GradSyncMixin, cls), {})
        _swap(module, _SYNC_CLASSES[cls], tp_sync={}, tp_group=group)
    module.tp_sync[leaf] = spec


class TensorParallelLM(LM):
    def logits(self, hidden):
        """Full logits (gathered over the vocab shards), as the plain model's."""
        out = gather_last(self.local_logits(hidden), self.tp_group)
        return out[..., : self.cfg.vocab_size] if out.shape[-1] != self.cfg.vocab_size else out

    def local_logits(self, hidden):
        """(B, L, V_padded / tp): this rank's vocab shard of the logits."""
        return F.linear(copy_to(hidden, self.tp_group), self.head_weight)

    def loss(self, input_ids, labels, ignore_index: int = -100):
        hidden, _ = self.hidden_states(input_ids)
        local = self.local_logits(hidden).float().flatten(0, 1)
        return vocab_parallel_cross_entropy(local, labels.flatten(), self.tp_vocab_start, self.cfg.vocab_size,
                                            self.tp_group, ignore_index)


# ---- vocab-parallel cross entropy --------------------------------------------------------------

class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group):
        n, vl = logits.shape
        cols = torch.arange(vocab_start, vocab_start + vl, device=logits.device)
        logits = logits.masked_fill(cols >= vocab_size, float("-inf"))  # padded rows never predicted
        mx = logits.max(-1).values
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - mx[:, None]
        mine = (target >= vocab_start) & (target < vocab_start + vl)
        local_t = (target - vocab_start).clamp(0, vl - 1)
        picked = torch.where(mine, shifted.gather(1, local_t[:, None]).squeeze(1), torch.zeros_like(mx))
        exp = shifted.exp()
        sums = torch.stack((picked, exp.sum(-1)))
        dist.all_reduce(sums, group=group)
        ctx.save_for_backward(exp.div_(sums[1][:, None]), mine, local_t)
        return sums[1].log() - sums[0]

    @staticmethod
    def backward(ctx, g):
        softmax, mine, local_t = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= mine.to(grad.dtype)
        return grad * g[:, None], None, None, None, None


def vocab_parallel_cross_entropy(local_logits, target, vocab_start: int, vocab_size: int, group,
                                 ignore_index: int = -100):
    """Mean cross entropy from vocab-sharded logits (N, V_padded / tp), target (N,) global ids;
    equals F.cross_entropy on the gathered, unpadded logits."""
    valid = target != ignore_index
    losses = _VocabParallelCE.apply(local_logits, target.masked_fill(~valid, -1), vocab_start, vocab_size, group)
    return (losses * valid).sum() / valid.sum()


# ---- apply -------------------------------------------------------------------------------------

def _split(name: str, count: int, tp: int, what: str) -> int:
    if count % tp:
        raise ValueError(f"tensor parallel {tp}: {name} has {count} {what}, not divisible")
    return count // tp


def _local_units(count: int, tp: int) -> int:
    return count // tp if count % tp == 0 else 1  # fewer than ranks: one copied unit per rank


def _enter_region(module: nn.Module, group) -> None:
    module.register_forward_pre_hook(lambda mod, args: (copy_to(args[0], group), *args[1:]))


def apply_tensor_parallel(model: LM, tp_group) -> LM:
    """Shard `model` (a plain LM, identical on every rank of `tp_group`) in place; returns it."""
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    rules = model_rules(model)  # raises on a parameter without a rule, before anything changes
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    _split("the padded vocab", model.cfg.padded_vocab_size, tp, "rows")
    g = tp_group
    for name, m in model.named_modules():
        if isinstance(m, (Attention, Retention, GLA)):
            h, kv = m.n_heads, m.n_kv_heads
            m.n_heads, m.n_kv_heads = _split(name, h, tp, "heads"), _local_units(kv, tp)
            _swap(m.o_proj, RowParallelLinear, tp_group=g)
            if isinstance(m, Retention):
                _swap(m, TPRetention, tp_global_heads=h, tp_head0=rank * m.n_heads)
            _enter_region(m, g)
        elif isinstance(m, Mamba):
            m.d_inner = _split(name, m.d_inner, tp, "inner channels")
            _swap(m.x_proj, ReducedRowLinear, tp_group=g)
            _swap(m.out_proj, RowParallelLinear, tp_group=g)
            _enter_region(m, g)
        elif isinstance(m, Mamba2):
            n_groups = m.n_groups
            m.n_heads = _split(name, m.n_heads, tp, "heads")
            m.d_inner = m.n_heads * m.head_dim
            m.n_groups = _local_units(n_groups, tp)
            m.conv_dim = m.d_inner + 2 * m.n_groups * m.d_state
            if n_groups % tp:  # a group spans ranks: its norm statistics too
                _swap(m.norm, TPGatedRMSNorm, tp_group=g, tp_n_groups=n_groups, tp_group_idx=rank * n_groups // tp)
            _swap(m.out_proj, RowParallelLinear, tp_group=g)
            _enter_region(m, g)
        elif isinstance(m, MLP):
            _swap(m.down_proj, RowParallelLinear, tp_group=g)
            _enter_region(m, g)
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
    _swap(model.embed, VocabParallelEmbedding, tp_group=g, vocab_start=rank * model.embed.weight.shape[0])
    _swap(model, TensorParallelLM, tp_group=g, tp_size=tp, tp_rank=rank, tp_rules=rules,
          tp_vocab_start=rank * model.embed.weight.shape[0])
    return model
