"""Layout-free training state: weights and Adam moments under global keys, so a run saved at one
TP x PP x DP layout (ZeRO stage, dtype) resumes at any other.

A training checkpoint holds DeepSpeed's own files (exact and fast, but per rank: they restore only
the layout that wrote them) and, next to them, two torch.distributed.checkpoint folders written
with checkpoint/sharded.py (global keys, each tensor as chunks at their global offsets):

    weights/     fp32 (master) weights                keys: the global parameter names
    optimizer/   the AdamW moments and step counts    keys: exp_avg/<name>, exp_avg_sq/<name>,
                                                            step/<name> (shape [1])

A moment has its parameter's shape and TP rule, so it is split, copied (GQA KV heads, Mamba-2
groups) and owned exactly like the weight. The first DP replica writes; the pipeline stage owning
a key writes it (the tied head's copy is stage 0's embedding).

Where this rank's fp32 master weights and moments live inside DeepSpeed's optimizer wrappers (and
which of them cannot be carried: NVMe-offloaded state, DeepSpeed's own Adam kernels) is
train/deepspeed_internals.OptimizerView's business, the one place that reads DeepSpeed's private
state.

The fp32 master weights (weights/) are read through that view: a bf16 run saves its master
copies, not the bf16-rounded parameters, and a resume at another layout sets them back.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megaxatl.checkpoint.model_dir import CheckpointError
from megaxatl.checkpoint.sharded import Layout, ShardedCheckpoint, load_sharded, save_sharded, seal_sharded
from megaxatl.parallel.tp_rules import Replicate
from megaxatl.checkpoint.agree import agreed
from megaxatl.train.deepspeed_internals import MOMENTS, STEP, OptimizerView, param_shape
from megaxatl.train.engine import collective_device

_BATCH_NUMEL = 1 << 28  # elements read at a time: 1 GiB of fp32 weights, 2 GiB of moments


def _key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def _kept(t: torch.Tensor, par) -> torch.Tensor:
    """What a rank keeps of a tensor it saves: the data on the writing DP replica, only shape and
    dtype (a meta tensor) on the others, which take part in the save's planning but write nothing."""
    return t.cpu() if par.dp_rank == 0 else torch.empty(t.shape, dtype=t.dtype, device="meta")


def _batches(named, limit: int = _BATCH_NUMEL):
    batch, size = [], 0
    for name, p in named:
        numel = param_shape(p).numel()
        if batch and size + numel > limit:
            yield batch
            batch, size = [], 0
        batch.append((name, p))
        size += numel
    if batch:
        yield batch


# ---- weights ----------------------------------------------------------------------------------

def save_weights(folder: Path, named, view: OptimizerView, layout: Layout, par, config: dict) -> None:
    """Collective: every rank's fp32 master weights; the first DP replica writes. The folder is
    a sharded model folder of `config` (shards.json with checksums): `megaxatl reshard` reads it."""
    local = {}
    for name, p in named:
        full = view.master(p)  # collective under ZeRO: every rank, every parameter
        if layout.stage_of(name) == par.pp_rank:
            local[name] = _kept(full, par)
    save_sharded(folder, local, layout.rules, layout.shapes, par.tp_rank, par.tp, writer=par.dp_rank == 0)
    seal_sharded(folder, config, par.tp, par.pp)


def load_weights(folder: Path, named, layout: Layout, par) -> ShardedCheckpoint:
    """Fill this rank's parameters (TP-local, this stage's) in place; before deepspeed.initialize,
    so ZeRO's partitions and master copies start from them. No collective. -> the open folder
    (its files' checksums checked), for restore_master_weights."""
    ckpt = ShardedCheckpoint(folder)
    load_sharded(ckpt, {name: p.data for name, p in named}, layout.rules, par.tp_rank, par.tp)
    return ckpt


def weights_fill(folder: Path):
    """load_weights as an init fill (`fill(local, layout, par)`, called once per unit under ZeRO-3):
    the folder is opened, and its checksums checked, once."""
    opened: list = []

    def fill(local, layout, par):
        if not opened:
            opened.append(ShardedCheckpoint(folder))
        load_sharded(opened[0], {name: p.data for name, p in local.items()}, layout.rules, par.tp_rank, par.tp)

    fill.release = opened.clear
    return fill


def restore_master_weights(ckpt: ShardedCheckpoint, named, view: OptimizerView, layout: Layout, par) -> None:
    """After deepspeed.initialize: a bf16 run's fp32 master copies were made from the bf16-rounded
    parameters; set them from the saved fp32 weights (`ckpt`: what load_weights opened). No
    collective."""
    todo = [(n, p) for n, p in named if view.needs_master(p)]
    for batch in _batches(todo):
        bufs = {n: torch.empty(param_shape(p), dtype=torch.float32) for n, p in batch}
        load_sharded(ckpt, bufs, layout.rules, par.tp_rank, par.tp)
        for n, p in batch:
            view.set_master(p, bufs[n])


# ---- optimizer moments ------------------------------------------------------------------------

def save_optimizer(folder: Path, named, view: OptimizerView, layout: Layout, par, config: dict) -> bool:
    """Collective: this rank's moments under global keys. -> False (nothing written) when they are
    not portable or no update has run yet."""
    if view.problem is not None:
        return False
    local, rules, shapes = {}, {}, {}
    for name, p in named:
        values = view.read(p)  # collective over DP under ZeRO: every rank, every parameter
        if values is None or layout.stage_of(name) != par.pp_rank:
            continue
        for k in MOMENTS:
            local[_key(k, name)] = _kept(values[k], par)
            rules[_key(k, name)], shapes[_key(k, name)] = layout.rules[name], layout.shapes[name]
        local[_key(STEP, name)] = torch.tensor([values[STEP]], dtype=torch.float64)
        rules[_key(STEP, name)], shapes[_key(STEP, name)] = Replicate(), (1,)
    empty = torch.tensor([float(not local)], device=collective_device())
    dist.all_reduce(empty, op=dist.ReduceOp.MAX)
    if empty.item():  # some rank has no state (no update ran yet): none is written
        return False
    save_sharded(folder, local, rules, shapes, par.tp_rank, par.tp, writer=par.dp_rank == 0)
    seal_sharded(folder, config, par.tp, par.pp, meta={"contents": "AdamW moments"})
    return True


def restore_optimizer(folder: Path, named, view: OptimizerView, layout: Layout, par,
                      why_absent: str | None = None) -> str | None:
    """Collective. Set this rank's moments from `folder`; -> None when restored, else why the
    optimizer starts afresh (the same answer on every rank). why_absent: what the checkpoint
    says about a missing folder."""
    problem = view.problem
    if problem is None and not (Path(folder) / ".metadata").is_file():
        problem = f"the checkpoint has no layout-free optimizer state ({why_absent or f'{folder} missing'})"
    ckpt, error = None, None
    if problem is None:
        try:  # an error here must reach the agreement below, not leave the other ranks waiting in it
            ckpt = ShardedCheckpoint(folder)
            entries = ckpt.entries()
            missing = [n for n, _ in named if _key(MOMENTS[0], n) not in entries]
            if missing:
                problem = f"{folder}: no moments for '{missing[0]}' ({len(missing)} parameters)"
        except CheckpointError as e:
            error = e
    bad = torch.tensor([2.0 if error else float(problem is not None)], device=collective_device())
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if bad.item() == 2.0:
        raise CheckpointError(f"{folder}: another rank could not read the layout-free optimizer state")
    if bad.item():
        return problem or "another rank could not read the layout-free optimizer state"
    rules = {}
    for name, _ in named:
        rules.update({_key(k, name): layout.rules[name] for k in MOMENTS})
        rules[_key(STEP, name)] = Replicate()
    with agreed():  # a shard's checksum is checked when first read: a bad file fails only its readers
        for batch in _batches(named):
            bufs = {}
            for name, p in batch:
                bufs.update({_key(k, name): torch.empty(param_shape(p), dtype=torch.float32) for k in MOMENTS})
                bufs[_key(STEP, name)] = torch.empty(1, dtype=torch.float64)
            load_sharded(ckpt, bufs, rules, par.tp_rank, par.tp)
            for name, p in batch:
                view.write(p, {**{k: bufs[_key(k, name)] for k in MOMENTS}, STEP: bufs[_key(STEP, name)].item()})
        view.finish()
    return None
