"""Parameter groups and the optimizer.

Groups are split by (transferred from the donor vs fresh) x (weight decay vs none):

    role                   params                                     LR
    fresh/decay            new matrices (mixers, a fresh head)         main schedule
    fresh/no_decay         new A_log, D, norms, biases                 main schedule
    transferred/decay      copied MLP / W_O / attention matrices       0 while frozen, then own warmup
    transferred/no_decay   copied norms, biases, embeddings            0 while frozen, then own warmup

No decay: whatever models/params.py marks (A_log, D, norm weights, embeddings; marked where the
parameter is created, never by name matching), plus every module's `bias` (found by module
attribute, not by name). Embeddings are decayed only when `train.decay_embeddings` is set.
Empty groups are left out (DeepSpeed's ZeRO flattening does not want them).

The optimizer is torch's AdamW by default, handed to `deepspeed.initialize` as a client optimizer:
DeepSpeed's own CPUAdam / FusedAdam JIT-compile on first use (1.5-2.5 minutes on a fresh machine),
so they are opt-in (`train.optimizer`).
"""

from __future__ import annotations

import torch
from torch import nn

from megaxatl.config.schema import TrainConfig
from megaxatl.models.params import is_no_decay

ROLES = ("fresh/decay", "fresh/no_decay", "transferred/decay", "transferred/no_decay")


def _bias_and_embedding_ids(model: nn.Module) -> tuple[set[int], set[int]]:
    biases, embeddings = set(), set()
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            biases.add(id(bias))
        if isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
    return biases, embeddings


def param_groups(model: nn.Module, transferred: set[str] | list[str], cfg: TrainConfig,
                 named: list | None = None, all_names: set[str] | None = None) -> list[dict]:
    """-> torch param-group dicts, each with a `role` key (read by the scheduler) and `names`.

    named: [(global name, parameter)] when `model`'s own names are not the global ones (a pipeline
    stage); all_names: every global name of the whole model, to check `transferred` against."""
    transferred = set(transferred)
    named = list(model.named_parameters()) if named is None else named
    names = all_names if all_names is not None else {n for n, _ in named}
    unknown = sorted(transferred - names)
    if unknown:
        # A transfer output for another layout: refuse rather than silently train it all.
        raise ValueError(f"transferred parameter names not in the model: {unknown[:5]}")
    biases, embeddings = _bias_and_embedding_ids(model)
    buckets: dict[str, tuple[list, list]] = {r: ([], []) for r in ROLES}
    seen: set[int] = set()
    for name, p in named:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if id(p) in embeddings:
            no_decay = not cfg.decay_embeddings
        else:
            no_decay = is_no_decay(p) or id(p) in biases
        role = ("transferred" if name in transferred else "fresh") + ("/no_decay" if no_decay else "/decay")
        buckets[role][0].append(p)
        buckets[role][1].append(name)
    groups = []
    for role, (params, pnames) in buckets.items():
        if params:
            wd = 0.0 if role.endswith("no_decay") else cfg.weight_decay
            groups.append({"params": params, "names": pnames, "role": role, "weight_decay": wd, "lr": cfg.lr})
    return groups


def build_optimizer(groups: list[dict], cfg: TrainConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    # `names` is our bookkeeping; torch keeps unknown keys, but DeepSpeed's CPUAdam does not need them.
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # foreach: one fused loop over all tensors of a group (fast on CPU and GPU); fused=False
        # keeps the exact same arithmetic on both so CPU tests match GPU runs' semantics.
        return torch.optim.AdamW(clean, foreach=True, **kwargs)
    if cfg.optimizer == "ds_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(clean, adamw_mode=True, **kwargs)
    if cfg.optimizer == "ds_fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(clean, adam_w_mode=True, **kwargs)
    raise ValueError(f"train.optimizer: unknown optimizer '{cfg.optimizer}'")
