"""StepGuard: the optimizer step skipped on a non-finite gradient, and the gradient norm.

A finite loss can still give an inf/NaN gradient (an overflow in a scan, a bad kernel), and a
pipeline-parallel step cannot drop a bad micro-batch before its backward as the plain loop does.
So the guard sits where every layout passes: the (inner) optimizer's `step`, which DeepSpeed
calls on every rank once per optimizer step, after gradients are reduced. It

1. sums the squared gradients this rank holds and all-reduces them over the world: one collective
   gives every rank the same verdict;
2. when the sum is not finite, skips the update (weights and moments untouched; `overflow` set, so
   DeepSpeed counts a skipped step) and records it;
3. otherwise, when it owns clipping (fp32 without ZeRO: see engine.own_clipping), scales the
   gradients to `clip` and steps.

The norm it reports is exact under TP and PP when it sees the module's parameters (ZeRO-0): a
TP-sharded tensor counts on every TP rank, a replicated one on TP rank 0 only, the last stage's
copy of a tied embedding not at all, and DP replicas are divided out. Under ZeRO-1/2 it sees flat
fp32 partitions (nothing to tell shards from copies), so it only decides finiteness there and the
norm comes from DeepSpeed's ZeRO optimizer (which already skips steps whose norm is not finite).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _counts(p: torch.Tensor, tp_rank: int) -> bool:
    if getattr(p, "ds_pipe_replicated", False):
        return False
    return bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0


class StepGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, clip: float = 0.0, tp_rank: int = 0, dp: int = 1):
        self.optimizer, self.clip, self.tp_rank, self.dp = optimizer, clip, tp_rank, dp
        self.skipped = 0
        self.last_skipped = False
        self.last_norm: float | None = None
        self._step = optimizer.step
        optimizer.step = self.step  # an instance attribute: DeepSpeed calls optimizer.step()
        optimizer.overflow = False

    def _grads(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p

    @torch.no_grad()
    def step(self, closure=None):
        params = list(self._grads())
        sq = torch.zeros(1, dtype=torch.float64)
        for p in params:
            if _counts(p, self.tp_rank):
                sq += p.grad.detach().float().pow(2).sum().double().cpu()
        if dist.is_initialized() and dist.get_world_size() > 1:
            sq = sq.to(params[0].device if params else "cpu")
            dist.all_reduce(sq)
            sq = sq.cpu()
        total = float(sq.item()) / self.dp
        norm = math.sqrt(total) if math.isfinite(total) else float("nan")
        self.last_norm = norm
        self.last_skipped = not math.isfinite(norm)
        self.optimizer.overflow = self.last_skipped
        if self.last_skipped:
            self.skipped += 1
            return None
        if self.clip > 0 and norm > self.clip:
            scale = self.clip / (norm + 1e-6)
            for p in params:
                p.grad.mul_(scale)
        return self._step(closure) if closure is not None else self._step()
