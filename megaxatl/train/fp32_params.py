"""bf16 training: the forward of every `keeps_fp32` parameter (A_log, D, dt bias) reads its fp32
master, not its bf16 copy (models/params.py says why and what the rounding costs).

DeepSpeed's bf16 engine casts every parameter to bf16 and keeps the fp32 masters inside its
optimizer wrapper; it has no per-parameter exception (`data_types.keep_in_fp32_modules` keeps
buffers only). So the trainer attaches each marked parameter's master to it (params.FP32_MASTER),
which `params.fp32(p)` reads:

    FP16_UnfusedOptimizer (bf16, ZeRO-0)   its per-parameter fp32 copy, the very tensor AdamW
                                           steps: attached once, always current
    ZeRO-1/2, the bf16 optimizer (pipeline) a parameter's master is spread over the DP ranks'
    ZeRO-3                                 partitions: gathered (OptimizerView.master, a
                                           collective over the DP group) into a copy, refreshed
                                           after every optimizer step and after a resume

On a fresh start the masters DeepSpeed made from the bf16-cast parameters are first set to the
values before the cast (the init, init_from or transfer), which the rounding would otherwise
lose before the first step. The masters are small (d_inner x N + 2 d_inner per Mamba-1 layer,
3 H per Mamba-2 layer). fp32 training attaches nothing: the parameters are fp32 already.
"""

from __future__ import annotations

import torch

from megaxatl.models.params import FP32_MASTER, keeps_fp32


def initial_values(named) -> dict[str, torch.Tensor]:
    """The marked parameters' values before DeepSpeed's set-up casts them (a fresh start): the
    masters it makes are copies of the bf16-cast parameters, so the fp32 init or transferred value
    would be lost to the rounding before the first step."""
    return {n: p.detach().float().clone() for n, p in named if keeps_fp32(p)}


class Fp32Masters:
    def __init__(self, named, view, initial: dict[str, torch.Tensor] | None = None):
        """named: [(global name, parameter)] this rank holds; view: the trainer's OptimizerView;
        initial: `initial_values` taken before the engine's set-up, on a fresh start (a resume
        has its masters from the checkpoint)."""
        self.view = view
        # the same list on every rank of a DP group (refresh is collective under ZeRO): whether the
        # optimizer keeps separate masters, not whether this rank's partition holds a piece of p
        separate = view.copies is not None or view.flat is not None or view.z3 is not None
        self.params = [(n, p) for n, p in named if keeps_fp32(p) and separate and p.dtype != torch.float32]
        # FP16_UnfusedOptimizer: the copies AdamW steps in place can be attached as they are
        self.live = view.copies is not None
        if initial is not None:
            for n, p in self.params:
                view.set_master(p, initial[n])
        self.refresh()

    def refresh(self) -> None:
        """Attach the current masters. Every rank, in the same order (collective under ZeRO);
        call after each optimizer step and after anything that sets the masters (a resume)."""
        for _, p in self.params:
            if self.live:
                setattr(p, FP32_MASTER, self.view.copies[id(p)])
            else:
                setattr(p, FP32_MASTER, self.view.master(p).to(p.device))

    def release(self) -> None:
        """Detach the masters (the engine is going away: they would go stale)."""
        for _, p in self.params:
            if hasattr(p, FP32_MASTER):
                delattr(p, FP32_MASTER)
