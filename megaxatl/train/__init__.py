"""Pretraining with DeepSpeed: XATL freeze/unfreeze, ZeRO 0-3, checkpoints, resume, metrics.

    run(cfg, ...) -> TrainResult          trainer.py   (launchers/pretrain.py is its CLI)
    FreezePolicy, GradGate                freeze.py    when and how transferred weights train
    param_groups, build_optimizer         optim.py
    GroupLRScheduler, base_lr             schedule.py
    ds_config, init_distributed           engine.py
    Metrics, flops_per_token              metrics.py
    checkpoint                            checkpoint.py  training checkpoints (complete or absent)

Exports are lazy so that `import megaxatl.train.freeze` does not import DeepSpeed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run": "trainer", "TrainResult": "trainer", "TrainingDiverged": "trainer",
    "FreezePolicy": "freeze", "GradGate": "freeze",
    "param_groups": "optim", "build_optimizer": "optim",
    "GroupLRScheduler": "schedule", "base_lr": "schedule",
    "ds_config": "engine", "init_distributed": "engine",
    "Metrics": "metrics", "flops_per_token": "metrics",
    "apply_overrides": "overrides", "load_with_overrides": "overrides",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megaxatl.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megaxatl.train' has no attribute {name!r}")
