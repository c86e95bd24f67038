"""The TP x PP x DP process layout of a training job, on DeepSpeed's topology and grid.

Rank order is DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model): TP ranks are
adjacent (they all-reduce every layer, so they belong inside one node), then DP, then pipeline
stages. The grid is what DeepSpeed calls `mpu`: it gives the engine its data-parallel group
(gradients are averaged over DP only) and the model-parallel group its gradient norm reduces over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass
class ParallelState:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    topology: Any = None  # deepspeed PipeModelDataParallelTopology (None: plain data parallel)
    grid: Any = None      # its PipelineParallelGrid, DeepSpeed's mpu
    tp_group: Any = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return f"TP {self.tp} x PP {self.pp} x DP {self.dp}"


def layout_problem(tp: int, pp: int, world: int) -> str | None:
    if world % (tp * pp):
        return (f"the world of {world} ranks is not a multiple of tp x pp = {tp} x {pp} = {tp * pp} "
                f"(world size = tp x pp x dp)")
    return None


def setup_parallel(tp: int, pp: int) -> ParallelState:
    """Collective (every rank): the groups of a tp x pp x dp job over the initialised world."""
    world, rank = dist.get_world_size(), dist.get_rank()
    problem = layout_problem(tp, pp, world)
    if problem:
        raise ValueError(problem)
    dp = world // (tp * pp)
    if tp == 1 and pp == 1:
        return ParallelState(1, 1, dp, 0, 0, rank)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    grid = PipelineParallelGrid(topology=topo)
    coord = topo.get_coord(rank)
    return ParallelState(tp, pp, dp, coord.model, coord.pipe, coord.data, topo, grid,
                         grid.get_slice_parallel_group() if tp > 1 else None)
