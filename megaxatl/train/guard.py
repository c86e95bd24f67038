"""StepGuard: the optimizer step skipped on a non-finite gradient, and the gradient norm.

A finite loss can still give an inf/NaN gradient (an overflow in a scan, a bad kernel), and a
pipeline-parallel step cannot drop a bad micro-batch before its backward as the plain loop does.
So the guard sits where every layout passes: the (inner) optimizer's `step`, which DeepSpeed
calls on every rank after gradients are reduced. It

1. sums the squared gradients this rank counts and all-reduces them over the world: one
   collective gives every rank the same norm and the same verdict;
2. when the norm is not finite, skips the update (weights and moments untouched; `overflow` set,
   so DeepSpeed counts a skipped step) and records it;
3. otherwise scales the gradients to `clip` when the norm exceeds it (DeepSpeed's own clipping is
   off: engine.ds_config) and steps.

With a NormPlan (train/gradnorm.py, attached by the trainer once DeepSpeed has built its
optimizer) the norm is exact at any layout: shards counted on every TP rank, replicated tensors
and copied KV heads / Mamba-2 groups once, the last stage's tied embedding copy not at all. ZeRO-1/2
call `step` once per param group (one group in `param_groups` at a time), so the verdict and the
clip scale are decided once, at the start of DeepSpeed's ZeRO step over every group's reduced
gradient, and kept for each group's call: an update is skipped or clipped whole, never group by
group. ZeRO-3 likewise, per sub-group. (Clipping the flat fp32 gradient each call hands AdamW is
the same as clipping the model's.)

Without a plan (a bare optimizer, or a DeepSpeed wrapper gradnorm does not know, which the trainer
warns about) each call decides over the gradients it steps, counting a tensor on every TP rank
when it is marked tensor-model-parallel and on TP rank 0 otherwise: exact for a module's own
parameters, not for flat partitions (which carry no such mark).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megaxatl.train.deepspeed_internals import is_pipe_replicated, set_overflow
from megaxatl.train.engine import collective_device


def _counts(p: torch.Tensor, tp_rank: int) -> bool:
    if is_pipe_replicated(p):
        return False
    return bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0


class StepGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, clip: float = 0.0, tp_rank: int = 0, dp: int = 1):
        self.optimizer, self.clip, self.tp_rank, self.dp = optimizer, clip, tp_rank, dp
        self.plan = None  # gradnorm.NormPlan
        self.skipped = 0
        self.last_skipped = False
        self.last_norm: float | None = None
        self._verdict: tuple[bool, float] | None = None  # (skip, clip scale) of this optimizer step
        self._step = optimizer.step
        optimizer.step = self.step  # an instance attribute: DeepSpeed calls optimizer.step()
        set_overflow(optimizer, False)

    def attach(self, plan, zero_optimizer=None) -> None:
        """Count by `plan` (gradnorm.NormPlan); with plan.before_zero_step, decide at the start of
        `zero_optimizer`'s step (DeepSpeed's ZeRO-1/2 optimizer, which then calls ours per group)."""
        self.plan = plan
        if plan is not None and plan.before_zero_step:
            inner = zero_optimizer.step

            def step(*args, **kwargs):
                if torch.cuda.is_available():  # CPU-offloaded gradients arrive by non-blocking copies
                    torch.cuda.synchronize()
                self._verdict = self._decide([])
                return inner(*args, **kwargs)
            zero_optimizer.step = step

    def begin_step(self) -> None:
        """An optimizer step starts: the next call decides it."""
        self._verdict = None

    def _grads(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p

    def _decide(self, params: list[torch.Tensor]) -> tuple[bool, float]:
        if self.plan is not None:
            sq, divisor = self.plan.local_sq(), self.plan.divisor
        else:
            sq, divisor = None, self.dp
            for p in params:
                if _counts(p, self.tp_rank):
                    part = p.grad.detach().float().pow(2).sum().double()
                    sq = part if sq is None else sq + part
        device = collective_device()  # NCCL: CUDA tensors (offloaded gradients sum on the CPU)
        sq = sq.reshape(1).to(device) if sq is not None else torch.zeros(1, dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)
        total = float(sq.item()) / divisor
        norm = math.sqrt(total) if math.isfinite(total) else float("nan")
        self.last_norm = norm
        self.last_skipped = not math.isfinite(norm)
        if self.last_skipped:
            self.skipped += 1
            return True, 1.0
        return False, (self.clip / (norm + 1e-6) if self.clip > 0 and norm > self.clip else 1.0)

    @torch.no_grad()
    def step(self, closure=None):
        params = list(self._grads())
        verdict = self._verdict if self.plan is not None and self._verdict is not None else self._decide(params)
        if self.plan is not None:
            self._verdict = verdict
        skip, scale = verdict
        set_overflow(self.optimizer, skip)
        if skip:
            return None
        if scale != 1.0:
            for p in params:
                p.grad.mul_(scale)
        return self._step(closure) if closure is not None else self._step()
