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

Where this rank's fp32 moments live, by what DeepSpeed wrapped around our torch AdamW:

    the AdamW itself (fp32, ZeRO-0)   optimizer.state[param]
    FP16_UnfusedOptimizer (bf16,      an fp32 copy per parameter (its fp32_groups), stepped by AdamW:
    ZeRO-0)                           optimizer.state[copy]
    ZeRO-1/2, the bf16 optimizer      one flat fp32 partition per param group; a parameter's piece
                                      on this DP rank is at `param._hp_mapping`'s fragment addresses
                                      (DeepSpeed's own bookkeeping, what its safe_get_full_* helpers
                                      read). We go through the addresses and the flat state rather
                                      than safe_set_full_optimizer_state because DeepSpeed links its
                                      per-parameter state views only after the first optimizer step
                                      and a resume must set the moments before it.
    ZeRO-3                            one flat fp32 partition per sub-group; DeepSpeed's
                                      safe_get_full_optimizer_state gathers a parameter's moments,
                                      and we set this rank's slice of them (creating the flat
                                      state first when resuming)
    NVMe-offloaded state, DeepSpeed's  moments not portable: no optimizer/ is written, and a resume
    own Adam kernels (CPUAdam, ...)    at another layout restarts the optimizer and says so.

The fp32 master weights (weights/) are read through the same view: a bf16 run saves its master
copies, not the bf16-rounded parameters, and a resume at another layout sets them back.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from megaxatl.checkpoint.model_dir import CheckpointError
from megaxatl.checkpoint.sharded import Layout, ShardedCheckpoint, load_sharded, save_sharded, seal_sharded
from megaxatl.parallel.tp_rules import Replicate
from megaxatl.train.engine import collective_device

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP = "step"
_BATCH_NUMEL = 1 << 28  # elements read at a time: 1 GiB of fp32 weights, 2 GiB of moments


def _key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def param_shape(p: torch.Tensor) -> torch.Size:
    """This rank's (TP-local) shape of p, also when ZeRO-3 has partitioned it away."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


@contextmanager
def agreed(what: str):
    """Collective, around reading `what`: when a CheckpointError ends the block on any rank, every
    rank raises (its own error where it has one), so none is left waiting in a later collective
    for one that has gone. (A shard's checksum is checked when first read: a corrupt file fails
    only the ranks that read it.)"""
    error = None
    try:
        yield
    except CheckpointError as e:
        error = e
    flag = torch.tensor([float(error is not None)], device=collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if flag.item():
        raise CheckpointError(f"{what}: failed on another rank (its error names the file)")


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


# ---- where DeepSpeed keeps each parameter's fp32 master and moments -----------------------------

class OptimizerView:
    """This rank's fp32 master weights and AdamW moments, per parameter (TP-local, global names
    are the caller's), whatever DeepSpeed wrapped around our torch AdamW (module docstring).

    `problem`: why the moments cannot be read or set here (None: they can); master weights always can."""

    def __init__(self, engine_optimizer, optimizer):
        self.opt = optimizer
        self.flat: list[torch.Tensor] | None = None       # ZeRO-1/2, BF16_Optimizer
        self.copies: dict[int, torch.Tensor] | None = None  # FP16_UnfusedOptimizer (bf16, ZeRO-0)
        self.z3: list[torch.Tensor] | None = None           # ZeRO-3's fp32 sub-group partitions
        self.engine_opt = engine_optimizer
        self.known = True  # whether the fp32 masters and gradients are where this view looks
        self.problem: str | None = None
        wraps = getattr(engine_optimizer, "optimizer", None) is optimizer
        flat = (getattr(engine_optimizer, "single_partition_of_fp32_groups", None)
                or getattr(engine_optimizer, "fp32_groups_flat_partition", None))
        if engine_optimizer is optimizer:
            pass  # AdamW steps the module's own parameters
        elif wraps and flat is not None:
            self.flat = list(flat)
        elif wraps and hasattr(engine_optimizer, "fp32_partitioned_groups_flat"):
            if getattr(engine_optimizer, "swap_optimizer", False):
                self.problem = "ZeRO-3 with the optimizer state offloaded to NVMe"
            self.z3 = list(engine_optimizer.fp32_partitioned_groups_flat)
        elif wraps and hasattr(engine_optimizer, "fp32_groups") and hasattr(engine_optimizer, "fp16_groups"):
            self.copies = {id(lp): hp for lps, hps in zip(engine_optimizer.fp16_groups, engine_optimizer.fp32_groups)
                           for lp, hp in zip(lps, hps)}
        else:  # e.g. FP16_Optimizer (DeepSpeed's fused Adam with bf16): flat copies we do not map
            self.known = False
            self.problem = f"DeepSpeed's {type(engine_optimizer).__name__} keeps its state in a form not saved layout-free"
        if type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam):
            self.problem = f"{type(optimizer).__name__}: only torch AdamW moments are saved layout-free"

    def hp_of(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor AdamW steps for p (not under ZeRO)."""
        return self.copies[id(p)] if self.copies is not None else p

    # -- master weights
    def master(self, p: torch.Tensor) -> torch.Tensor:
        """p's fp32 master weight. Collective over p's DP group under ZeRO."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p)
        return (full if full is not None else self.hp_of(p)).detach().float()

    def needs_master(self, p: torch.Tensor) -> bool:
        """Whether DeepSpeed keeps a separate fp32 copy of p made from a rounded p at set-up (an
        fp32 p was loaded exactly, and so was the copy made from it)."""
        separate = self.copies is not None or getattr(p, "_hp_mapping", None) is not None or hasattr(p, "ds_id")
        return separate and p.dtype != torch.float32

    def set_master(self, p: torch.Tensor, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        if self.copies is not None:
            self.copies[id(p)].data.copy_(value)
        elif self.z3 is not None:
            self._z3_write(p, value, None)
        else:
            safe_set_full_fp32_param(p, value.to(p.device))

    def _z3_write(self, p: torch.Tensor, value: torch.Tensor, key: str | None) -> None:
        """Set this DP rank's slice of p's fp32 master (key None) or moment `key` from the full
        TP-local value. (DeepSpeed's set_full_hp_param narrows the value by the padded partition
        size: past its end on the last rank when p's size does not divide by the DP size.)"""
        opt = self.engine_opt
        part, group = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        start = dist.get_rank(group=p.ds_process_group) * p.ds_tensor.ds_numel
        valid = max(0, min(part.numel(), p.ds_numel - start))
        with torch.no_grad():  # the master partition is a leaf that requires grad
            part.narrow(0, 0, valid).copy_(value.reshape(-1).narrow(0, start, valid).to(part.device, part.dtype))
        if opt._swappable_optimizer_subgroup(group):
            opt._optimizer_states_and_gradient_swap_out(group)

    # -- moments
    def _flat_state(self, i: int) -> dict:
        return self.opt.state.get(self.flat[i]) or {}

    def _z3_group(self, p: torch.Tensor) -> int:
        return self.engine_opt.grad_position[self.engine_opt.get_param_id(p)][0]

    def read(self, p: torch.Tensor) -> dict | None:
        """{exp_avg, exp_avg_sq: fp32 like p, step: float} or None (no update has run yet).
        Collective over p's DP group under ZeRO (each rank holds a piece)."""
        if self.z3 is not None:
            from deepspeed.utils import safe_get_full_optimizer_state

            # every sub-group steps together: state exists for all or none, on every rank alike
            state = self.opt.state.get(self.z3[self._z3_group(p)]) or {}
            if not all(k in state for k in (*MOMENTS, STEP)):
                return None
            out = {k: safe_get_full_optimizer_state(p, k).detach().float().view(p.ds_shape) for k in MOMENTS}
            return {**out, STEP: float(state[STEP])}
        if self.flat is None:
            state = self.opt.state.get(self.hp_of(p)) or {}
            if not all(k in state for k in (*MOMENTS, STEP)):
                return None
            return {**{k: state[k].detach().float() for k in MOMENTS}, STEP: float(state[STEP])}
        m = p._hp_mapping
        dev = collective_device()  # NCCL: CUDA tensors, also when the partitions sit on the CPU
        # [have state, step] of this rank's piece, agreed over the DP group in one collective
        meta = torch.zeros(2, dtype=torch.float64, device=dev)
        state = self._flat_state(m.param_group_index) if m is not None else {}
        mine = m is not None and all(k in state for k in (*MOMENTS, STEP))
        if mine:
            meta[0], meta[1] = 1.0, float(state[STEP])
        out = {}
        for k in MOMENTS:
            buf = torch.zeros(p.numel(), dtype=torch.float32, device=dev)
            if mine:
                buf.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel).copy_(
                    state[k].narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel))
            dist.all_reduce(buf, group=p._dp_group)
            out[k] = buf.view(p.shape)
        dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=p._dp_group)
        return {**out, STEP: float(meta[1].item())} if meta[0].item() else None

    def write(self, p: torch.Tensor, values: dict) -> None:
        """Set p's moments (full TP-local fp32 tensors) and step. No collective."""
        step = torch.tensor(float(values[STEP]), dtype=torch.float32)
        if self.z3 is not None:
            for f in self.z3:  # the flat state written into must exist first
                state = self.opt.state[f]
                for k in MOMENTS:
                    if k not in state:
                        state[k] = torch.zeros_like(f)
                state[STEP] = step.clone()  # AdamW increments it in place: one tensor per group
            for k in MOMENTS:
                self._z3_write(p, values[k], k)
            return
        if self.flat is None:
            hp = self.hp_of(p)
            self.opt.state[hp] = {STEP: step, **{k: values[k].to(device=hp.device, dtype=hp.dtype).clone()
                                                 for k in MOMENTS}}
            return
        m = p._hp_mapping
        if m is None:  # no piece of p in this DP rank's partition
            return
        flat = self.flat[m.param_group_index]
        state = self.opt.state[flat]
        for k in MOMENTS:
            if k not in state:
                state[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state[k].narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel).copy_(
                values[k].reshape(-1).narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel))
        state[STEP] = step  # one step per flat group: every parameter of it has the same

    def finish(self) -> None:
        """After the writes: a flat group holding no piece of any parameter here (padding only)
        still gets a complete state, with the step of the others, as AdamW expects."""
        if self.flat is None:
            return
        steps = [self.opt.state[f][STEP] for f in self.flat if STEP in self.opt.state.get(f, {})]
        for f in self.flat:
            state = self.opt.state[f]
            if STEP not in state and steps:
                state.update({**{k: torch.zeros_like(f) for k in MOMENTS}, STEP: max(steps).clone()})


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
    with agreed(str(folder)):
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
