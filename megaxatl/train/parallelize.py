"""The model made parallel for this rank (torchtitan's order: build whole, then apply).

    plain LM (on the meta device, or built with the same weights on every rank)
      -> tensor parallel (tp > 1): parallel.apply_tensor_parallel over the TP group
      -> storage and values for this rank's part only (`fill`: train/init.py), when on meta;
         under ZeRO-3 unit by unit, each partitioned over the DP group as soon as it is filled
      -> pipeline stage  (pp > 1): parallel.pipeline.build_pipeline, this rank's stage only
      -> DeepSpeed (ZeRO over the DP group) in the trainer

Every parameter keeps its global (canonical, layout-free) name here, which is what the optimizer
groups, the freeze policy, the checkpoints and the logs use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from megaxatl.config import Config, ConfigError
from megaxatl.parallel.groups import ParallelState, layout_problem, setup_parallel


@dataclass
class Parallelized:
    module: nn.Module  # what DeepSpeed wraps: the (TP) LM, or this rank's PipelineModule stage
    lm: nn.Module      # the (TP-sharded) LM; with pp > 1 only this stage's parts are used
    named: list       # [(global name, parameter)] this rank holds, tied copies once
    state: ParallelState
    # ZeRO-3 built unit by unit (train/init.materialize_partitioned): the fp32 values of the
    # keeps_fp32 parameters before their cast, and the peak parameter elements stored at once
    # (materialize_partitioned says what it counts)
    initial: dict | None = None
    peak_elements: int | None = None

    @property
    def mpu(self) -> Any:
        # a PipelineModule brings its own grid; TP alone needs ours for DP-only reduction
        return self.state.grid if self.state.tp > 1 and self.state.pp == 1 else None


def parallel_state(cfg: Config, world: int, source: str = "") -> ParallelState:
    p = cfg.parallel
    problem = layout_problem(p.tp, p.pp, world)
    if problem:
        raise ConfigError(source, "parallel", problem)
    return setup_parallel(p.tp, p.pp)


def parallelize(lm, cfg: Config, state: ParallelState, loss_wrapper=None, fill=None, layout=None) -> Parallelized:
    """loss_wrapper: loss_fn -> loss_fn, applied to the pipeline's last-stage loss (a test hook).
    fill, layout: `lm` is on the meta device; this rank's parameters get storage after the TP cut
    and are filled by fill(local, layout, state) (train/init.py); the rest stays on meta."""
    if state.tp > 1:
        from megaxatl.parallel import apply_tensor_parallel

        apply_tensor_parallel(lm, state.tp_group, sequence_parallel=cfg.parallel.sequence_parallel)
    if fill is not None and cfg.parallel.zero_stage == 3 and state.pp == 1:
        from megaxatl.train.init import local_names, materialize_partitioned

        _, initial, peak = materialize_partitioned(lm, local_names(layout, state), layout, state, fill,
                                                   zero3_partitioner(cfg, state), _train_dtype(cfg))
        return Parallelized(lm, lm, _unique(lm.named_parameters()), state, initial, peak)
    if fill is not None:
        from megaxatl.train.init import local_names, materialize, release_fill

        materialize(lm, local_names(layout, state), layout, state, fill)
        release_fill(fill)
    if state.pp == 1:
        return Parallelized(lm, lm, _unique(lm.named_parameters()), state)
    from megaxatl.parallel.pipeline import build_pipeline, stage_named_parameters

    from megaxatl.parallel.pipeline import pipeline_loss

    loss_fn = pipeline_loss(lm)
    module, names = build_pipeline(lm, state.topology, loss_wrapper(loss_fn) if loss_wrapper else loss_fn)
    return Parallelized(module, lm, list(stage_named_parameters(module, names)), state)


def zero3_partitioner(cfg: Config, state: ParallelState):
    """params -> partitioned over the DP group in place, as DeepSpeed's ZeRO-3 set-up would do to a
    whole module (runtime/zero/parameter_offload.py: zero.Init(module=...) with the engine's config
    and the DP group), so deepspeed.initialize finds a ZeRO-Init model and partitions nothing."""
    import deepspeed
    from torch import nn as _nn

    from megaxatl.train.engine import ds_config

    config = ds_config(cfg, state.tp * state.pp * state.dp)
    mpu = state.grid if state.tp > 1 else None
    group = mpu.get_data_parallel_group() if mpu is not None else None

    def partition(params: list) -> None:
        holder = _nn.Module()  # zero.Init(module=) takes a module: one holding just these
        for i, p in enumerate(params):
            holder.register_parameter(f"p{i}", p)
        deepspeed.zero.Init(module=holder, data_parallel_group=group, config_dict_or_path=config, mpu=mpu)

    return partition


def _train_dtype(cfg: Config):
    import torch

    return torch.bfloat16 if cfg.train.dtype == "bf16" else None


def _unique(named) -> list:
    seen, out = set(), []
    for name, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out
