"""Initial weights, built for this rank only: scratch, a weights folder (`train.init_from`), or a donor.

The construction path (what megatron-core's CPU init and torchtitan's meta-device init both aim
at, done our way):

    1. the whole LM on the meta device (shapes only, no storage);
    2. tensor parallelism applied to it there (parameters become their TP-local shapes);
    3. this rank's parameters, and the buffers of the units they belong to, get storage:
       only this pipeline stage's (the first and last stage both hold a tied embedding);
    4. they are filled: scratch from models.lm.build_unit, one unit (embedding, block, norm, head)
       at a time from (seed, its global name), whole, then cut to this rank's TP part, so every
       value is the same at any layout; a weights folder by reading this rank's slices only;
       a donor through the streamed transfer (transfer/stream.py: each local tensor whole, the
       layout-free init plus its donor copies, then cut; only its own donor tensors are read).

The rest of the model (other stages) stays on the meta device for the whole run: no rank holds
another stage's storage. Peak host memory is the local shard plus one whole unit.

Under ZeRO-3 (materialize_partitioned) steps 3 and 4 run one unit at a time, and each unit is
handed to DeepSpeed's partitioner before the next gets storage: the local shard itself is never
whole on a rank, only its 1/dp partitions plus the unit being built (and the fill's own copy of
it, for scratch) are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from megaxatl.config import Config


@dataclass
class Initial:
    """Where the weights come from; `fill(local, layout, par)` writes them into this rank's tensors
    ({global name: materialised local parameter})."""
    source: str  # "init_from:<path>", "donor:<name>", "scratch", "resume"
    fill: Callable
    transferred: list[str] = field(default_factory=list)
    report: dict | None = None
    tokenizer_dir: str | None = None


def plan_initial(cfg: Config, resuming: bool, selection=None) -> Initial:
    """Cheap: opens headers / indexes only; the reads happen in `fill`. `selection`: what
    select_layers_agreed chose for transfer.keep_attention (its costs go into the report)."""
    seed = cfg.train.seed
    if resuming:  # the checkpoint's weights are loaded later; start from the scratch values
        return Initial("resume", lambda local, layout, par: fill_scratch(cfg, seed, local, layout, par))
    if cfg.train.init_from:
        return _from_weights(cfg, Path(cfg.train.init_from))
    if cfg.transfer.donor:
        return _from_donor(cfg, selection)
    return Initial("scratch", lambda local, layout, par: fill_scratch(cfg, seed, local, layout, par))


def local_names(layout, par) -> set[str]:
    """The global parameter names this rank holds: its stage's (the last stage also holds a tied
    embedding, which DeepSpeed keeps in step with the first stage's)."""
    names = {n for n in layout.shapes if layout.stage_of(n) == par.pp_rank}
    if par.pp > 1 and par.pp_rank == par.pp - 1 and "lm_head.weight" not in layout.shapes:
        names.add("embed.weight")
    return names


def materialize(lm: nn.Module, names: set[str], layout, par, fill: Callable) -> dict[str, nn.Parameter]:
    """Give the parameters `names` of a meta-device (TP-applied) LM storage, in place (the
    Parameter objects, and so their markers, are kept), fill them, and compute the buffers of the
    units they belong to. -> {global name: parameter}."""
    from megaxatl.models.lm import unit_of

    params = dict(lm.named_parameters())
    local = {}
    for name in sorted(names, key=list(params).index):
        p = params[name]
        attrs = dict(p.__dict__)
        new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        torch.utils.swap_tensors(p, new)
        p.__dict__.update(attrs)
        local[name] = p
    fill(local, layout, par)
    _fill_buffers(lm, {unit_of(n) for n in names}, lm.cfg)
    return local


def materialize_partitioned(lm: nn.Module, names: set[str], layout, par, fill: Callable,
                            partition: Callable, dtype: torch.dtype | None = None) -> tuple[dict, dict, int]:
    """ZeRO-3: `materialize` one unit at a time, each handed to `partition` (its parameters ->
    partitioned in place, full storage freed) before the next unit gets storage, so a rank never
    holds more than its partitions plus one whole unit. fill is called once per unit with that
    unit's parameters (the values are those of one call with all: fills are per name). dtype: the
    parameters' training dtype, cast to before partitioning (DeepSpeed casts a ZeRO-Init model's
    parameters no more). -> ({global name: parameter}, the fp32 values of the parameters that
    keep fp32 masters, taken before that cast, the peak number of parameter elements with
    storage at once: partitions plus the unit being built; a fill's own temporaries, such as
    scratch's reference unit, are not parameters and not counted)."""
    from megaxatl.checkpoint.agree import agreed
    from megaxatl.models.lm import unit_of
    from megaxatl.models.params import keeps_fp32

    order = {n: i for i, (n, _) in enumerate(lm.named_parameters())}  # units in module order, as DeepSpeed would
    by_unit: dict[str, list[str]] = {}
    for name in sorted(names, key=order.__getitem__):
        by_unit.setdefault(unit_of(name), []).append(name)
    local, initial, held, peak = {}, {}, 0, 0
    for unit, unit_names in by_unit.items():
        with agreed():  # a fill failing on one rank must not leave the others in the partitioner's broadcast
            part = materialize(lm, set(unit_names), layout, par, fill)
        whole = sum(p.numel() for p in part.values())
        peak = max(peak, held + whole)
        for name, p in part.items():
            if keeps_fp32(p):
                initial[name] = p.detach().float().clone()
            if dtype is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        partition(list(part.values()))
        held += sum(stored_elements(p) for p in part.values())
        local.update(part)
    release_fill(fill)
    return local, initial, peak


def release_fill(fill: Callable) -> None:
    """After the last call of a build: drop what a fill kept across its calls (an open weights
    folder, a transferred target)."""
    release = getattr(fill, "release", None)
    if release is not None:
        release()


def stored_elements(p: torch.Tensor) -> int:
    """Elements p holds storage for: its ZeRO-3 partition, or itself."""
    ds = getattr(p, "ds_tensor", None)
    return p.data.numel() + (ds.numel() if ds is not None else 0)


def _fill_buffers(lm: nn.Module, units: set[str], cfg) -> None:
    """Buffers (rotary frequencies) are computed in constructors: take them from a unit built on
    the CPU (any seed: they are not random). A buffer the TP cut changed would be refused."""
    from megaxatl.models.lm import build_unit

    for unit in sorted(units):
        module = lm.get_submodule(unit)
        if not any(True for _ in module.buffers()):
            continue
        ref = dict(build_unit(cfg, unit, 0).named_buffers())
        for bname, buf in list(module.named_buffers()):
            r = ref[bname]
            if tuple(r.shape) != tuple(buf.shape):
                raise ValueError(f"{unit}.{bname}: buffer shape {tuple(buf.shape)} after tensor parallelism, "
                                 f"{tuple(r.shape)} whole; cannot materialise it")
            owner, _, leaf = bname.rpartition(".")
            (module.get_submodule(owner) if owner else module)._buffers[leaf] = r.to(buf.dtype)


@torch.no_grad()
def fill_scratch(cfg: Config, seed: int, local: dict, layout, par) -> None:
    """Scratch values: each unit whole from (seed, unit name), then this rank's TP part."""
    from megaxatl.models.lm import build_unit, unit_of
    from megaxatl.parallel.tp_rules import shard_tensor

    by_unit: dict[str, list[str]] = {}
    for name in local:
        by_unit.setdefault(unit_of(name), []).append(name)
    for unit, names in by_unit.items():
        ref = dict(build_unit(cfg, unit, seed).named_parameters())
        for name in names:
            full = ref.pop(name[len(unit) + 1:]).detach()
            part = shard_tensor(name, full, layout.rules[name], par.tp_rank, par.tp).clone() if par.tp > 1 else full
            _adopt(local[name], part)
        del ref


def _adopt(p: torch.Tensor, value: torch.Tensor) -> None:
    """p takes value's storage (the same object keeps its markers): the fresh, never-written
    storage materialize gave p is dropped untouched, so a unit is not resident twice."""
    if value.shape != p.shape or value.dtype != p.dtype:
        raise ValueError(f"fill: a {tuple(value.shape)} {value.dtype} value for a {tuple(p.shape)} {p.dtype} tensor")
    p.data = value


def _from_weights(cfg: Config, path: Path) -> Initial:
    """A model folder, sharded model folder or training checkpoint: this rank reads its slices only,
    and only the files it reads are checksummed (train/preflight.open_init)."""
    from megaxatl.train.preflight import open_init

    inp, _ = open_init(path)
    meta = inp.meta

    opened: list = []  # kept open across the calls of one build (one per unit under ZeRO-3)

    def fill(local, layout, par):
        from megaxatl.checkpoint.sharded import ShardedCheckpoint, load_sharded
        from megaxatl.train.preflight import open_init as reopen

        if not opened:  # opened on every rank, here, after the inputs were checked
            opened.append(reopen(path)[1])
            if not isinstance(opened[0], ShardedCheckpoint):
                _check_file(opened[0])
        source = opened[0]
        if isinstance(source, ShardedCheckpoint):
            load_sharded(source, {n: p.data for n, p in local.items()}, layout.rules, par.tp_rank, par.tp)
        else:
            _fill_from_safetensors(source, local, layout, par)

    fill.release = opened.clear
    return Initial(f"init_from:{path}", fill, list(meta.get("transferred", [])), meta.get("report"),
                   str(inp.tokenizer_dir) if inp.tokenizer_dir else None)


def _check_file(source) -> None:
    """A single-file model folder: its checksum is checked (the whole file is this rank's input)."""
    from megaxatl.checkpoint import CheckpointError
    from megaxatl.checkpoint.model_dir import read_meta
    from megaxatl.fsutil import sha256_file

    expected = read_meta(source.file.parent).get("sha256", {}).get(source.file.name)
    if expected and sha256_file(source.file) != expected:
        raise CheckpointError(f"{source.file}: checksum mismatch (corrupt or modified file)")


@torch.no_grad()
def _fill_from_safetensors(source, local: dict, layout, par) -> None:
    """Each tensor of a (checked, _check_file) single-file model folder read as this rank's slices
    only (safetensors reads regions lazily)."""
    from megaxatl.checkpoint.sharded import local_chunks

    for name, p in local.items():
        shape = layout.shapes[name]
        sl = source._f.get_slice(name)
        for c in local_chunks(name, layout.rules[name], shape, par.tp_rank, par.tp):
            if p.dim() == 0:
                c.local(p.data).copy_(sl[...])
                continue
            index = tuple(slice(c.global_offset, c.global_offset + c.size) if d == c.dim else slice(None)
                          for d in range(len(shape)))
            c.local(p.data).copy_(sl[index])


def select_layers_agreed(cfg: Config):
    """transfer.keep_attention: the pattern must be known before the meta-device build, and be the
    same on every rank (measured costs could differ in the last bit between devices), so rank 0
    measures and every rank takes its pattern. -> the Selection on rank 0, None elsewhere."""
    import torch.distributed as dist

    selection = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        from megaxatl.transfer.select import select_for_config

        t = cfg.transfer
        selection = select_for_config(cfg, t.donor, t.select_data, t.select_tokens, method=t.select_method)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megaxatl.train.engine import collective_device

        # the pattern's length is the template's (selection only changes symbols)
        code = torch.zeros(len(cfg.model.pattern), dtype=torch.uint8, device=collective_device())
        if selection is not None:
            code.copy_(torch.tensor(list(cfg.model.pattern.encode()), dtype=torch.uint8))
        dist.broadcast(code, src=0)
        cfg.model.pattern, cfg.transfer.keep_attention = bytes(code.cpu().tolist()).decode(), None
    return selection


def _from_donor(cfg: Config, selection) -> Initial:
    """Transfer in this process, streamed (transfer/stream.py): the plan and report come from the
    headers; each local parameter is its whole target tensor (the layout-free init plus its donor
    copies, one unit held at a time), then cut to this rank's TP part. A rank reads the donor
    tensors of its own parameters only and never holds the whole target."""
    initial = Initial(f"donor:{cfg.transfer.donor}", None)

    opened: list = []  # the TransferSource, kept across the calls of one build (per unit under ZeRO-3)

    @torch.no_grad()
    def fill(local, layout, par):
        from megaxatl.parallel.tp_rules import shard_tensor
        from megaxatl.transfer.stream import open_transfer  # lazy: donor readers pull in transformers

        if not opened:
            opened.append(open_transfer(cfg.transfer.donor, cfg, seed=cfg.train.seed))
        source, report = opened[0]
        order = {n: i for i, n in enumerate(source.entries())}  # model order: one unit built at a time
        for name in sorted(local, key=order.__getitem__):
            full = source.read(name)
            local[name].copy_(shard_tensor(name, full, layout.rules[name], par.tp_rank, par.tp) if par.tp > 1
                              else full)
        if selection is not None:
            report.selection, report.selection_table = selection.to_dict(), selection.table()
        initial.transferred, initial.report = list(report.transferred), report.to_dict()
        initial.tokenizer_dir = report.tokenizer_dir

    fill.release = opened.clear
    initial.fill = fill
    return initial
