"""Learning-rate schedule: linear warmup then cosine to min_lr, with per-group multipliers.

`base_lr(step)` is the main schedule for optimizer step `step` (1-based: the step about to run).
Each param group carries a `role` (optim.py); the transferred groups' LR is the main LR times the
freeze policy's multiplier: 0 while frozen, then a linear warmup of its own into the main curve
(the paper: a high LR on newly trainable weights blows the loss up).

`GroupLRScheduler` follows torch's scheduler protocol (`step()`, `state_dict()`,
`load_state_dict()`, `get_last_lr()`) so DeepSpeed calls it after every optimizer step and saves it
in its checkpoints. It holds only the step count; the unfreeze step lives in the freeze policy
(one home), which the scheduler reads each time it sets the LRs.
"""

from __future__ import annotations

import math

from megaxatl.config.schema import TrainConfig
from megaxatl.train.freeze import FreezePolicy


def base_lr(step: int, cfg: TrainConfig) -> float:
    """Main schedule: lr * step / warmup for step <= warmup, then cosine from lr to min_lr at `steps`."""
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class GroupLRScheduler:
    """Sets every param group's `lr` for the next optimizer step."""

    def __init__(self, optimizer, cfg: TrainConfig, freeze: FreezePolicy):
        self.optimizer, self.cfg, self.freeze = optimizer, cfg, freeze
        self.last_step = 0  # optimizer steps completed
        self.apply()

    def lr_for(self, role: str, step: int) -> float:
        lr = base_lr(step, self.cfg)
        return lr * self.freeze.lr_multiplier(step) if role.startswith("transferred") else lr

    def apply(self) -> None:
        """Write the LRs of step last_step + 1 into the groups (after a resume or an unfreeze too)."""
        step = self.last_step + 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_for(group.get("role", "fresh"), step)

    def step(self, *args, **kwargs) -> None:
        self.last_step += 1
        self.apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.apply()
