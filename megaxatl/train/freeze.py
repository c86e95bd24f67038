"""XATL freeze / unfreeze: when the weights copied from the donor start to train.

Two parts, kept apart on purpose:

* `FreezePolicy` decides *when* (pure bookkeeping, no tensors): `none`, `fixed` (frozen for the
  first `unfreeze_step` optimizer steps) or `lit`, the paper's Loss Improvement Threshold: the mean
  training loss over consecutive windows of `window` steps; the relative improvement between
  consecutive windows is (prev - cur) / prev; when it is below `threshold` for `patience` windows
  in a row, the transferred weights unfreeze. The trainer calls `observe(step, loss)` once per
  optimizer step with the DP-averaged loss (so every rank decides the same) and gets True exactly
  once, at the step after which the weights are trainable.

* `GradGate` makes *frozen* mean something that holds under every ZeRO stage.

Why not `requires_grad = False`: DeepSpeed builds its flat fp32 partitions and param groups once,
in `deepspeed.initialize`; ZeRO-1/2 drop parameters that do not require grad from those partitions
and ZeRO-3 registers its gradient hooks on what it saw, so flipping `requires_grad` later either
leaves the weights out of the optimizer for good or breaks the reduction bookkeeping. Instead every
parameter stays in the optimizer from the start, and while frozen:

1. a tensor hook on each transferred parameter replaces its gradient by zeros *before* it reaches
   DeepSpeed's accumulate/reduce hooks (tensor hooks on a leaf run before AccumulateGrad), so the
   frozen weights add nothing to the gradient norm used for clipping, and their Adam moments stay
   zero (no stale moments are applied at unfreeze time);
2. their param groups have LR 0 (schedule.py), so AdamW's decoupled weight decay (p -= lr*wd*p) and
   the update (p -= lr * m / (sqrt(v) + eps), with m = 0) are exact no-ops: the weights stay
   bit-identical until the unfreeze step (tests/test_train_freeze.py checks this bit for bit).

At unfreeze the hooks are removed and the groups get their own linear LR warmup into the main
schedule. The cost of this design: the backward pass still computes the frozen weights' gradients
(the weight-gradient GEMMs of the copied MLPs / W_O, about a third of those layers' backward
FLOPs), DP still reduces their (zero) gradients, and their optimizer state (2 fp32 words per
parameter, sharded under ZeRO-1+) is held from step 0. `requires_grad=False` would save that
compute and communication, but only works without ZeRO or by rebuilding the engine (and its
partitions) at the unfreeze step; in XATL the frozen phase is a small fraction of training, so we
take the simpler, stage-independent design.
"""

from __future__ import annotations

from typing import Iterable

import torch

from megaxatl.config.schema import FreezeConfig


class FreezePolicy:
    """Decides the unfreeze step. Steps are 1-based counts of completed optimizer steps."""

    def __init__(self, cfg: FreezeConfig):
        self.cfg = cfg
        self.policy = cfg.policy
        # None while frozen (or never frozen: see `frozen`); the step after which weights train.
        self.unfrozen_at: int | None = None
        # LIT bookkeeping
        self._window_losses: list[float] = []
        self._prev_mean: float | None = None
        self._streak = 0
        self.history: list[dict] = []  # one record per closed LIT window (for logs and tests)
        if self.policy == "none" or (self.policy == "fixed" and cfg.unfreeze_step == 0):
            self.unfrozen_at = 0

    @property
    def frozen(self) -> bool:
        return self.unfrozen_at is None

    def observe(self, step: int, loss: float) -> bool:
        """Record optimizer step `step`'s mean loss; True iff the weights unfreeze after this step."""
        if not self.frozen:
            return False
        if self.policy == "fixed":
            if step >= self.cfg.unfreeze_step:
                self.unfrozen_at = step
                return True
            return False
        # lit
        self._window_losses.append(float(loss))
        if len(self._window_losses) < self.cfg.window:
            return False
        cur = sum(self._window_losses) / len(self._window_losses)
        self._window_losses = []
        record = {"step": step, "window_mean": cur}
        if self._prev_mean is not None:
            prev = self._prev_mean
            rel = (prev - cur) / prev if prev > 0 else 0.0
            self._streak = self._streak + 1 if rel < self.cfg.threshold else 0
            record.update(rel_improvement=rel, streak=self._streak)
        self._prev_mean = cur
        self.history.append(record)
        if self._streak >= self.cfg.patience:
            self.unfrozen_at = step
            return True
        return False

    def lr_multiplier(self, step: int) -> float:
        """LR factor of the transferred groups for optimizer step `step` (1-based, about to run).

        0 while frozen; after unfreezing at u, a linear warmup (step - u) / warmup_steps up to 1.
        A run that never froze (policy none, or fixed at 0) gets 1 from the start.
        """
        if self.unfrozen_at is None:
            return 0.0
        if self.unfrozen_at == 0 or self.cfg.warmup_steps == 0:
            return 1.0
        return min(1.0, (step - self.unfrozen_at) / self.cfg.warmup_steps)

    def state_dict(self) -> dict:
        return {"policy": self.policy, "unfrozen_at": self.unfrozen_at, "window_losses": list(self._window_losses),
                "prev_mean": self._prev_mean, "streak": self._streak, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("policy") != self.policy:
            # A changed policy on resume is allowed (an operator decision); start its bookkeeping
            # afresh but keep an unfreeze that already happened.
            if state.get("unfrozen_at") is not None:
                self.unfrozen_at = state["unfrozen_at"]
            return
        self.unfrozen_at = state["unfrozen_at"]
        self._window_losses = list(state["window_losses"])
        self._prev_mean = state["prev_mean"]
        self._streak = state["streak"]
        self.history = list(state["history"])


class GradGate:
    """Zeroes the gradients of a set of parameters while closed (see the module docstring)."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = list(params)
        self._handles: list = []

    @property
    def closed(self) -> bool:
        return bool(self._handles)

    def close(self) -> None:
        if self._handles:
            return
        # zeros_like rather than g * 0: a NaN/inf gradient must not leak into the reduction.
        self._handles = [p.register_hook(torch.zeros_like) for p in self.params]

    def open(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
