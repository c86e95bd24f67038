"""Every read or write of DeepSpeed's private state, in one place, behind one version gate.

DeepSpeed's public API (deepspeed.initialize, engine.backward / step / save_checkpoint /
load_checkpoint, the safe_get_full_* helpers, PipelineModule, zero_to_fp32) is used where it is
needed. What it does not offer is read or written here and nowhere else:

    where each optimizer wrapper keeps a parameter's fp32 master and AdamW moments   OptimizerView
    a ZeRO-1/2 slice's gradient fragment, a ZeRO-3 partition's bounds               fragment*, zero3_slice
    a parameter's TP-local shape once ZeRO-3 has partitioned it away                param_shape
    the pipeline engine's mark on the last stage's tied-embedding copy              is_pipe_replicated
    the `overflow` flag DeepSpeed reads to count a skipped step                     set_overflow
    the step counters of an engine resumed from layout-free state                   set_step_counters
    the op-compatibility table (to skip a JIT build training never uses)            skip_shm_comm_build

These are attributes DeepSpeed may rename in any release, and a wrong guess would not fail loudly:
it would read the wrong slice. So the versions they were checked against are stated once
(SUPPORTED) and `check_version` stops a run at start-up, with one line, on any other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaxatl import exitcodes
from megaxatl.train.engine import collective_device

# [low, high): the DeepSpeed releases the trainer's tests passed with (CI runs the version in
# constraints.txt). 0.18.9 fails multi-rank ZeRO steps on torch 2.13 (an in-place write to a split
# view inside DeepSpeed); 0.19.0-0.19.2 give a pipeline run with a tied embedding other losses than
# one process. pyproject.toml declares the same range.
SUPPORTED = ("0.19.3", "0.20.0")


class UnsupportedDeepSpeed(RuntimeError):
    """The installed DeepSpeed is outside SUPPORTED (or missing)."""

    exit_code = exitcodes.BAD_INPUT


def supported_range() -> str:
    return f"deepspeed>={SUPPORTED[0]},<{SUPPORTED[1]}"


def check_version(version: str | None = None) -> str:
    """-> the installed DeepSpeed version; UnsupportedDeepSpeed (one line) outside SUPPORTED."""
    from packaging.version import Version

    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        try:
            version = installed("deepspeed")
        except PackageNotFoundError:
            raise UnsupportedDeepSpeed(f"DeepSpeed is not installed; the trainer needs {supported_range()}") from None
    v = Version(version)
    if not Version(SUPPORTED[0]) <= Version(v.base_version) < Version(SUPPORTED[1]):
        raise UnsupportedDeepSpeed(f"deepspeed {version} is not supported: the trainer reads DeepSpeed's internal "
                                   f"optimizer and ZeRO state, checked on {supported_range()} "
                                   f"(pip install '{supported_range()}')")
    return version


def skip_shm_comm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory all-reduce (~1 min on a fresh machine) when its comm
    backend starts; it only serves inference all-reduce, never training."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ---- per-parameter bookkeeping ----------------------------------------------------------------

def param_shape(p: torch.Tensor) -> torch.Size:
    """This rank's (TP-local) shape of p, also when ZeRO-3 has partitioned it away."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def is_pipe_replicated(p: torch.Tensor) -> bool:
    """The last pipeline stage's copy of a tied embedding (stage 0 holds the one that counts)."""
    return bool(getattr(p, "ds_pipe_replicated", False))


def fragment(p: torch.Tensor) -> tuple[int, int] | None:
    """(start, numel) of p's flat piece in this DP rank's ZeRO-1/2 (or bf16 optimizer) partition;
    None when the partition holds none of p."""
    m = getattr(p, "_hp_mapping", None)
    if m is None:
        return None
    return m.lp_fragment_address.start, m.lp_fragment_address.numel


def fragment_grad(p: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's reduced gradient of p's piece (what safe_get_full_grad reads): the piece alone
    under ZeRO-1/2, the whole gradient under the bf16 optimizer of pipeline stages."""
    return p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)


def zero3_slice(p: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) of the flattened p that this DP rank's ZeRO-3 partition holds (the partition is
    padded past hi on the last rank when p's size does not divide by the DP size)."""
    n = p.ds_tensor.ds_numel
    lo = dist.get_rank(group=p.ds_process_group) * n
    return lo, min(lo + n, p.ds_numel)


def set_overflow(optimizer, flag: bool) -> None:
    """DeepSpeed reads the wrapped optimizer's `overflow` after its step to count a skipped one."""
    optimizer.overflow = flag


def set_step_counters(engine, step: int) -> None:
    """An engine resumed from layout-free state starts at `step` (DeepSpeed's own load sets these)."""
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()


# ---- where DeepSpeed keeps each parameter's fp32 master and moments -----------------------------

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP = "step"


class OptimizerView:
    """This rank's fp32 master weights and AdamW moments, per parameter (TP-local, global names
    are the caller's), whatever DeepSpeed wrapped around our torch AdamW:

        the AdamW itself (fp32, ZeRO-0)   optimizer.state[param]
        FP16_UnfusedOptimizer (bf16,      an fp32 copy per parameter (its fp32_groups), stepped by
        ZeRO-0)                           AdamW: optimizer.state[copy]
        ZeRO-1/2, the bf16 optimizer      one flat fp32 partition per param group; a parameter's piece
                                          on this DP rank is at `param._hp_mapping`'s fragment
                                          addresses (what DeepSpeed's safe_get_full_* helpers read).
                                          We go through the addresses and the flat state rather than
                                          safe_set_full_optimizer_state because DeepSpeed links its
                                          per-parameter state views only after the first optimizer
                                          step and a resume must set the moments before it.
        ZeRO-3                            one flat fp32 partition per sub-group;
                                          safe_get_full_optimizer_state gathers a parameter's
                                          moments, and we set this rank's slice of them (creating
                                          the flat state first when resuming)
        NVMe-offloaded state, DeepSpeed's moments not portable (`problem` says why)
        own Adam kernels (CPUAdam, ...)

    `problem`: why the moments cannot be read or set here (None: they can); master weights always
    can. `known`: whether the fp32 masters and gradients are where this view looks."""

    def __init__(self, engine_optimizer, optimizer):
        self.opt = optimizer
        self.flat: list[torch.Tensor] | None = None       # ZeRO-1/2, BF16_Optimizer
        self.copies: dict[int, torch.Tensor] | None = None  # FP16_UnfusedOptimizer (bf16, ZeRO-0)
        self.z3: list[torch.Tensor] | None = None           # ZeRO-3's fp32 sub-group partitions
        self.engine_opt = engine_optimizer
        self.known = True
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
        start, hi = zero3_slice(p)
        valid = max(0, min(part.numel(), hi - start))
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
        device = collective_device()  # NCCL: CUDA tensors, also when the partitions sit on the CPU
        # [have state, step] of this rank's piece, agreed over the DP group in one collective
        meta = torch.zeros(2, dtype=torch.float64, device=device)
        state = self._flat_state(m.param_group_index) if m is not None else {}
        mine = m is not None and all(k in state for k in (*MOMENTS, STEP))
        if mine:
            meta[0], meta[1] = 1.0, float(state[STEP])
        out = {}
        for k in MOMENTS:
            buf = torch.zeros(p.numel(), dtype=torch.float32, device=device)
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
