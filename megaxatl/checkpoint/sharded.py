"""Sharded model weights: torch.distributed.checkpoint (DCP) files with global keys, any TP x PP.

Keys are always the plain model's parameter names (`layers.3.mixer.in_proj.weight`); a tensor is
stored as chunks at their offsets in the global (canonical) tensor, so a checkpoint written at one
layout loads at any other, and plain `torch.distributed.checkpoint` (e.g. `format_utils.
dcp_to_torch_save`) reads it as the full state dict.

Which rank writes what (the TP rule of each parameter comes from parallel/tp_rules.py):

    Shard(dim[, pieces, units])  one chunk per piece: the rank's part of that piece, at its global
                                 offset (Mamba-1 in_proj [x, z]: two chunks per rank). A piece held
                                 as copies (fewer units than ranks: GQA KV heads, Mamba-2 groups) is
                                 written by the lowest TP rank holding that unit only.
    Replicate()                  TP rank 0 only.
    writer=False                 nothing (data-parallel replicas > 0); the rank still takes part in
                                 the collective. Each pipeline stage passes only the keys it owns
                                 (parallel/stages.stage_of_key; the tied head is `embed.weight`).

On disk (DCP's FileSystemWriter): `.metadata` (the index: key -> global shape, dtype, chunks ->
file, offset, length) and `__{rank}_0.distcp` (one per rank: its chunks, each a torch.save blob).
A *sharded model folder* adds `shards.json` ({"format": "megaxatl-sharded", "version": 1,
"layout": {"tp", "pp"}, "config": {...}, "sha256": {file: digest}, ...}) and optionally
`tokenizer/`; it is written atomically. `write_layout` writes a whole tp x pp layout from one
process, as if tp * pp ranks had written it (virtual rank = stage * tp + tp_rank, DeepSpeed's
rank order with one data-parallel replica), reading one source tensor at a time.

Checkpoint files are untrusted input: `.metadata` is unpickled with an allow-list of DCP's own
classes, tensor data is read by DCP with `torch.load(weights_only=True)`, and every problem (a
missing or truncated file, a checksum mismatch, a missing key, a shape mismatch) is a
CheckpointError naming the folder or file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import queue
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megaxatl.checkpoint.agree import agree_on
from megaxatl.checkpoint.model_dir import CheckpointError
from megaxatl.fsutil import atomic_dir, has_format, named, os_error, sha256_file
from megaxatl.parallel.tp_rules import Replicate, Rule, Shard, _local_part, _pieces

FORMAT = "megaxatl-sharded"
SHARDS_JSON = "shards.json"
DCP_METADATA = ".metadata"

Shape = tuple[int, ...]


# ---- chunks: which parts of a global tensor a TP rank holds, and which it writes --------------

@dataclass(frozen=True)
class Chunk:
    """A contiguous part of a tensor along `dim` (whole along every other dim): global
    [global_offset, +size) is local [local_offset, +size) on this rank. `owner`: this rank writes it."""
    dim: int
    global_offset: int
    local_offset: int
    size: int
    owner: bool

    def box(self, global_shape: Sequence[int]) -> tuple[torch.Size, torch.Size]:
        """(offsets, sizes) of the chunk in the global tensor."""
        if len(global_shape) == 0:
            return torch.Size(()), torch.Size(())
        offsets, sizes = [0] * len(global_shape), list(global_shape)
        offsets[self.dim], sizes[self.dim] = self.global_offset, self.size
        return torch.Size(offsets), torch.Size(sizes)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The chunk's view of the rank's local tensor."""
        return t if t.dim() == 0 else t.narrow(self.dim, self.local_offset, self.size)

    def of_global(self, t: torch.Tensor) -> torch.Tensor:
        """The chunk's view of the full global tensor."""
        return t if t.dim() == 0 else t.narrow(self.dim, self.global_offset, self.size)


def local_chunks(name: str, rule: Rule, global_shape: Sequence[int], tp_rank: int, tp_size: int) -> list[Chunk]:
    """The chunks TP rank `tp_rank` of `tp_size` holds of global tensor `name` (local order).
    ValueError when the rule cannot split this shape over `tp_size` ranks."""
    global_shape = tuple(global_shape)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"'{name}': TP rank {tp_rank} is outside TP size {tp_size}")
    if isinstance(rule, Replicate) or len(global_shape) == 0:
        if not isinstance(rule, Replicate):
            raise ValueError(f"'{name}': a scalar cannot be split by {rule}")
        size = global_shape[0] if global_shape else 1
        return [Chunk(0, 0, 0, size, tp_rank == 0)]
    if not isinstance(rule, Shard):
        raise ValueError(f"'{name}': unknown TP rule {rule!r}")
    out, global_off, local_off = [], 0, 0
    for p in _pieces(name, rule, global_shape[rule.dim], None, tp_size):
        o, n = _local_part(p, tp_rank, tp_size)
        # copies of one unit sit on tp // units adjacent ranks; the first of them writes it
        owner = p.split or tp_rank % (tp_size // p.units) == 0
        out.append(Chunk(rule.dim, global_off + o, local_off, n, owner))
        global_off += p.size
        local_off += n
    return out


def local_shape(global_shape: Sequence[int], chunks: list[Chunk]) -> Shape:
    shape = list(global_shape)
    if shape:
        shape[chunks[0].dim] = sum(c.size for c in chunks)
    return tuple(shape)


# ---- saving: a SavePlanner over plain tensors and our own chunk lists -------------------------

def _write_item(key: str, chunk: Chunk, shape: Shape, dtype: torch.dtype) -> WriteItem:
    offsets, sizes = chunk.box(shape)
    return WriteItem(index=MetadataIndex(key, offsets), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                                 properties=TensorProperties(dtype=dtype), size=torch.Size(shape)))


class _ChunkSavePlanner(SavePlanner):
    """Writes the given (key, chunk) items; `fetch(key, chunk, index)` returns a chunk's data.

    Each rank's plan carries every key it holds (writer or not) with its global shape and dtype,
    so the coordinator can check that every such key is covered exactly once by the chunks all
    ranks write: a key nobody writes, or one written twice (a tied head saved by two pipeline
    stages), fails the save instead of producing a checkpoint that cannot be loaded."""

    def __init__(self, items: list[tuple[str, Chunk]], entries: Mapping[str, tuple[Shape, torch.dtype]],
                 fetch: Callable[[str, Chunk, MetadataIndex], torch.Tensor], check: Callable[[], None] | None = None,
                 release_written: bool = False):
        self.items, self.entries, self.fetch, self.check = items, dict(entries), fetch, check
        self._chunks: dict[tuple[str, torch.Size], Chunk] = {}
        # FileSystemWriter keeps a reference to every tensor of a file until the file is closed (for
        # its safetensors option), which would hold a whole rank's data. With release_written (the
        # fetched tensors are ours: write_layout's copies, never model parameters) the previous
        # tensor's memory is freed when the next is asked for: DCP's serial loader asks for item
        # i + 1 only after item i is in the file.
        self.release_written = release_written
        self._previous: torch.Tensor | None = None

    def set_up_planner(self, state_dict=None, storage_meta: StorageMeta | None = None, is_coordinator: bool = False):
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        if self.check is not None:  # inside DCP's collective step, so a bad rank fails every rank
            self.check()
        out = []
        for key, chunk in self.items:
            shape, dtype = self.entries[key]
            item = _write_item(key, chunk, shape, dtype)
            self._chunks[(key, item.index.offset)] = chunk
            out.append(item)
        expected = {k: (tuple(s), str(d).removeprefix("torch.")) for k, (s, d) in self.entries.items()}
        return SavePlan(out, planner_data=expected)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        expected: dict[str, tuple] = {}
        for rank, plan in enumerate(all_plans):
            for key, val in (plan.planner_data or {}).items():
                if expected.setdefault(key, val) != val:
                    raise CheckpointError(f"'{key}': ranks disagree on its global shape / dtype "
                                          f"({expected[key]} vs {val} on rank {rank})")
        plans = [dataclasses.replace(p, planner_data=None) for p in all_plans]
        plans, md = create_default_global_save_plan(plans)
        written: dict[str, set[str]] = {}
        for p in all_plans:
            for i in p.items:
                written.setdefault(i.index.fqn, set()).add(str(i.tensor_data.properties.dtype).removeprefix("torch."))
        for key, (shape, dtype) in expected.items():
            _check_coverage(key, shape, dtype, md.state_dict_metadata.get(key), written.get(key, set()))
        # flat keys, recorded as DCP's default planner records a flat state dict's
        md = dataclasses.replace(md, planner_data={k: (k,) for k in md.state_dict_metadata})
        return plans, md

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        if self._previous is not None:
            self._previous.untyped_storage().resize_(0)
            self._previous = None
        chunk = self._chunks[(write_item.index.fqn, write_item.index.offset)]
        t = self.fetch(write_item.index.fqn, chunk, write_item.index).detach()
        want = write_item.tensor_data.chunk.sizes
        if t.shape != want or t.dtype != write_item.tensor_data.properties.dtype:
            raise CheckpointError(f"'{write_item.index.fqn}': chunk at {tuple(write_item.index.offset)} is "
                                  f"{tuple(t.shape)} {t.dtype}, expected {tuple(want)} "
                                  f"{write_item.tensor_data.properties.dtype}")
        t = t.cpu().contiguous()
        if self.release_written:
            self._previous = t
        return t


def _check_coverage(key: str, shape: Shape, dtype: str, md: TensorStorageMetadata | None, dtypes: set[str]) -> None:
    if md is None:
        raise CheckpointError(f"'{key}': held by some rank but written by none (is writer=True on one "
                              "data-parallel replica of every pipeline stage?)")
    if dtypes != {dtype}:
        raise CheckpointError(f"'{key}': chunks written with dtypes {sorted(dtypes)}, expected {dtype}")
    total = math.prod(shape)
    covered = sum(math.prod(c.sizes) for c in md.chunks)
    if covered != total:
        what = ("more than once (writer=True on two data-parallel replicas, or a key passed by two pipeline "
                "stages: each stage passes only the keys stages.stage_of_key gives it)") if covered > total else "partly"
        raise CheckpointError(f"'{key}': the ranks' chunks cover {covered} of its {total} elements: written {what}")
    if len(shape) and len(md.chunks) > 1:  # same volume but overlapping means a gap elsewhere
        dims = {d for c in md.chunks for d in range(len(shape)) if c.sizes[d] != shape[d]}
        if len(dims) == 1:
            d = dims.pop()
            spans = sorted((c.offsets[d], c.offsets[d] + c.sizes[d]) for c in md.chunks)
            if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
                raise CheckpointError(f"'{key}': written chunks overlap along dim {d}")


class _Writer(FileSystemWriter):
    """DCP's file writer, minus the writing folder's path in `.metadata`: folders are written under
    a temporary name and renamed into place, so the recorded path would be stale."""

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(save_id=self.save_id)


def _dcp_failure(path: Path, e: CheckpointException) -> CheckpointError | OSError:
    """DCP gathers every rank's exception; surface the first one as ours."""
    for rank, (exc, _) in sorted(e.failures.items()):
        failed = os_error(exc, path)
        if failed is not None:  # a full disk: an I/O error naming the file, not a bad checkpoint
            return named(failed, path)
        if isinstance(exc, RuntimeError) and "already exists" in str(exc):  # FileSystemWriter(overwrite=False)
            return CheckpointError(f"{path}: already holds a checkpoint ({DCP_METADATA}); save into a fresh folder")
        if isinstance(exc, CheckpointError):
            return CheckpointError(f"{path}: {exc} (rank {rank})")
        first = (str(exc).strip().splitlines() or [""])[0]
        return CheckpointError(f"{path}: saving failed on rank {rank}: {type(exc).__name__}: {first}")
    return CheckpointError(f"{path}: saving failed ({e})")


def save_sharded(path: str | Path, local: Mapping[str, torch.Tensor], rules: Mapping[str, Rule],
                 global_shapes: Mapping[str, Sequence[int]] | None, tp_rank: int, tp_size: int,
                 writer: bool = True, group=None) -> None:
    """Collective over `group` (every rank calls it; without an initialised process group, a
    single-process save). `local` maps global keys to this rank's TP-local tensors (as
    tp_rules.shard_tensor makes them); `global_shapes` their global shapes (None: inferred from the
    local shapes and rules). A pipeline stage passes only the keys it owns; writer=False (a
    data-parallel replica > 0) writes nothing. `path` must not already hold a DCP checkpoint."""
    path = Path(path)
    global_shapes = dict(global_shapes or {})
    entries: dict[str, tuple[Shape, torch.dtype]] = {}
    items: list[tuple[str, Chunk]] = []
    problems: list[str] = []
    for key, t in local.items():
        try:
            rule = rules[key]
            shape = tuple(global_shapes[key]) if key in global_shapes else _infer_global_shape(key, rule, t, tp_size)
            chunks = local_chunks(key, rule, shape, tp_rank, tp_size)
            if tuple(t.shape) != local_shape(shape, chunks):
                raise ValueError(f"'{key}': local tensor {tuple(t.shape)} is not TP rank {tp_rank}/{tp_size}'s "
                                 f"part {local_shape(shape, chunks)} of global {shape}")
        except KeyError:
            problems.append(f"'{key}': no tensor-parallel rule")
            continue
        except ValueError as e:
            problems.append(str(e))
            continue
        entries[key] = (shape, t.dtype)
        if writer:
            items += [(key, c) for c in chunks if c.owner]

    def check():
        if problems:
            raise CheckpointError("; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))

    planner = _ChunkSavePlanner(items, entries, lambda key, c, _: c.local(local[key]), check)
    use_dist = dist.is_available() and dist.is_initialized()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(dict(local), storage_writer=_Writer(path, overwrite=False, per_thread_copy_ahead=0),
                     planner=planner, process_group=group, no_dist=not use_dist)
    except CheckpointException as e:
        raise _dcp_failure(path, e) from None


def _write_shards_json(f: Path, meta: dict | None, tp: int, pp: int, config: dict, digests: dict) -> None:
    full = {"format": FORMAT, "version": 1, **(meta or {}), "layout": {"tp": tp, "pp": pp}, "config": config,
            "sha256": dict(sorted(digests.items()))}
    f.write_text(json.dumps(full, indent=2) + "\n")


def seal_sharded(path: str | Path, config: dict, tp: int, pp: int, meta: dict | None = None, group=None) -> None:
    """Collective over `group`, after save_sharded into `path`: write shards.json (format, layout,
    config, every file's sha256), which makes the folder a sharded model folder whose files are
    checked when read. Each rank hashes the files it wrote (DCP names them `__{rank}_*`), so the
    hashing is spread over the ranks like the writing."""
    path = Path(path)
    use_dist = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if use_dist else 0
    mine = {f.name: sha256_file(f) for f in sorted(path.glob(f"__{rank}_*.distcp"))}
    parts = [mine]
    if use_dist and dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, mine, group=group)
    error = None
    if rank == 0:
        try:  # a failure here (a full disk) must reach the other ranks, not leave them in a barrier
            digests = {DCP_METADATA: sha256_file(path / DCP_METADATA)}
            for part in parts:
                digests.update(part)
            tmp = path / f".{SHARDS_JSON}.tmp"
            _write_shards_json(tmp, meta, tp, pp, config, digests)
            tmp.replace(path / SHARDS_JSON)
        except OSError as e:
            error = e
    if use_dist:
        agree_on(error, group)
    elif error is not None:
        raise error


def _infer_global_shape(key: str, rule: Rule, t: torch.Tensor, tp: int) -> Shape:
    shape = list(t.shape)
    if isinstance(rule, Shard):
        shape[rule.dim] = sum(p.size for p in _pieces(key, rule, None, t.shape[rule.dim], tp))
    return tuple(shape)


# ---- reading: a LoadPlanner filling given views -----------------------------------------------

_SAFE_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
    *(("pathlib._local", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle; load it without running anything but DCP's own classes."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class _ChunkLoadPlanner(LoadPlanner):
    """Reads checkpoint regions into destination tensors: {key: [(dest, global offsets of dest)]}."""

    def __init__(self, dests: Mapping[str, list[tuple[torch.Tensor, torch.Size]]]):
        self.dests = dests

    def set_up_planner(self, state_dict=None, metadata: Metadata | None = None, is_coordinator: bool = False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, targets in self.dests.items():
            md = self.metadata.state_dict_metadata[key]
            chunks = [ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.shape) for t, off in targets]
            reads = create_read_items_for_chunk_list(key, md, chunks)
            got = [0] * len(targets)
            for r in reads:
                got[r.dest_index.index] += math.prod(r.lengths)
            for (t, off), n in zip(targets, got):
                if n != t.numel():  # saved chunks that do not tile the tensor: an incomplete save
                    raise CheckpointError(f"'{key}': the checkpoint holds {n} of the {t.numel()} elements at "
                                          f"offset {tuple(off)} size {tuple(t.shape)} (incomplete or inconsistent save)")
            items += reads
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise CheckpointError(f"'{read_item.dest_index.fqn}': stored as a pickled object, not a tensor")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        t = self.dests[read_item.dest_index.fqn][read_item.dest_index.index][0]
        for d, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(d, o, n)
        return t

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class ShardedCheckpoint:
    """An open DCP checkpoint folder: its index, checked files, and reads of any region.

    With `shards.json` in the folder and verify=True, each file's checksum is checked the first
    time it is read (`.metadata` at once)."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: sharded weights folder missing (or not a directory)")
        md_file = path / DCP_METADATA
        if not md_file.is_file():
            raise CheckpointError(f"{md_file}: missing (not a torch.distributed.checkpoint folder, or an unfinished save)")
        self._digests = (read_shards_meta(path).get("sha256", {}) if (path / SHARDS_JSON).is_file() and verify else {})
        self._verified: set[str] = set()
        self._verify(DCP_METADATA)
        try:
            with open(md_file, "rb") as f:
                md = _MetadataUnpickler(f).load()
        except Exception as e:
            raise CheckpointError(f"{md_file}: corrupt checkpoint index ({type(e).__name__}: {e})") from None
        if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
            raise CheckpointError(f"{md_file}: not a DCP checkpoint index (unpickled a {type(md).__name__})")
        self.metadata = md
        self._check_files()
        self.reader = FileSystemReader(path)
        self.reader.set_up_storage_reader(md, True)

    def _check_files(self) -> None:
        """Every file the index names exists and is long enough (a cheap check, no reads)."""
        ends: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            rel = str(info.relative_path)
            ends[rel] = max(ends.get(rel, 0), info.offset + info.length)
        for rel, end in sorted(ends.items()):
            f = self.path / rel
            if not f.is_file():
                raise CheckpointError(f"{f}: shard file missing (named by {self.path / DCP_METADATA})")
            size = f.stat().st_size
            if size < end:
                raise CheckpointError(f"{f}: shard file truncated ({size} bytes, the index needs {end})")

    def _verify(self, rel: str) -> None:
        if rel in self._verified or not self._digests:
            return
        f = self.path / rel
        expected = self._digests.get(rel)
        if expected is None:
            raise CheckpointError(f"{f}: not listed in {self.path / SHARDS_JSON}")
        if not f.is_file():
            raise CheckpointError(f"{f}: shard file missing (listed in {self.path / SHARDS_JSON})")
        if sha256_file(f) != expected:
            raise CheckpointError(f"{f}: checksum mismatch (corrupt or modified file)")
        self._verified.add(rel)

    def entries(self) -> dict[str, tuple[Shape, torch.dtype]]:
        """{key: (global shape, dtype)} in the index's order."""
        return {k: (tuple(v.size), v.properties.dtype) for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)}

    def _entry(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if md is None:
            raise CheckpointError(f"{self.path}: no tensor '{key}' in this checkpoint "
                                  f"({len(self.metadata.state_dict_metadata)} keys)")
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{self.path}: '{key}' is stored as a pickled object, not a tensor")
        return md

    def read_into(self, dests: Mapping[str, list[tuple[torch.Tensor, Sequence[int]]]]) -> None:
        """Fill each destination tensor (a view is fine) with the global region starting at its offsets."""
        for key in dests:
            self._entry(key)
        planner = _ChunkLoadPlanner({k: [(t, torch.Size(o)) for t, o in v] for k, v in dests.items()})
        planner.set_up_planner({}, self.metadata, True)
        plan = planner.create_local_plan()
        by_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            by_file.setdefault(str(self.metadata.storage_data[item.storage_index].relative_path), []).append(item)
        with torch.no_grad():
            for rel, items in by_file.items():
                self._verify(rel)
                try:
                    self.reader.read_data(LoadPlan(items), planner).wait()
                except CheckpointError:
                    raise
                except Exception as e:
                    first = (str(e).strip().splitlines() or [""])[0]
                    raise CheckpointError(f"{self.path / rel}: corrupt shard file ({type(e).__name__}: {first})") from None

    def read(self, key: str) -> torch.Tensor:
        """The full global tensor `key`."""
        md = self._entry(key)
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        self.read_into({key: [(out, (0,) * len(md.size))]})
        return out


def checkpoint_keys(path: str | Path) -> dict[str, tuple[Shape, torch.dtype]]:
    """{key: (global shape, dtype)} of a DCP checkpoint folder."""
    return ShardedCheckpoint(path, verify=False).entries()


def iter_full(path: str | Path, keys: Iterable[str] | None = None, verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, full tensor), one tensor in memory at a time; all keys in the index's order by default."""
    ckpt = ShardedCheckpoint(path, verify)
    for key in (list(keys) if keys is not None else list(ckpt.entries())):
        yield key, ckpt.read(key)


def read_full(path: str | Path, keys: Iterable[str] | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict (or the given keys) of a DCP checkpoint folder, at any layout."""
    return dict(iter_full(path, keys, verify))


def load_sharded(path: str | Path | ShardedCheckpoint, local: Mapping[str, torch.Tensor], rules: Mapping[str, Rule],
                 tp_rank: int, tp_size: int, verify: bool = True) -> None:
    """Fill this rank's TP-local tensors in place (global keys, tp_rules.shard_tensor layout) from
    a checkpoint written at any layout (a folder, or one already open). No collective: each rank
    reads only its own regions (copied pieces included). dtypes convert on copy."""
    ckpt = path if isinstance(path, ShardedCheckpoint) else ShardedCheckpoint(path, verify)
    path = ckpt.path
    entries = ckpt.entries()
    dests: dict[str, list[tuple[torch.Tensor, torch.Size]]] = {}
    for key, t in local.items():
        if key not in entries:
            raise CheckpointError(f"{path}: no tensor '{key}' in this checkpoint ({len(entries)} keys)")
        if key not in rules:
            raise CheckpointError(f"'{key}': no tensor-parallel rule")
        shape = entries[key][0]
        try:
            chunks = local_chunks(key, rules[key], shape, tp_rank, tp_size)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        want = local_shape(shape, chunks)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{path}: shape mismatch for '{key}': saved {shape}, whose TP rank {tp_rank}/{tp_size} "
                                  f"part is {want}, but the tensor to fill is {tuple(t.shape)}")
        view = t.detach()
        dests[key] = [(c.local(view), c.box(shape)[0]) for c in chunks]
    ckpt.read_into(dests)


# ---- a layout: the rules, shapes and stages of a model at tp x pp ------------------------------

@dataclass
class Layout:
    tp: int
    pp: int
    rules: dict[str, Rule]
    shapes: dict[str, Shape]         # every state-dict key of the model, in model order
    bounds: list[tuple[int, int]]    # stages.stage_bounds

    def stage_of(self, key: str) -> int:
        from megaxatl.parallel.stages import stage_of_key

        return stage_of_key(key, self.bounds)


def _describe(model, name: str, size: int, units: int | None) -> tuple[str, str, bool]:
    """What a piece of a parameter counts and where, for the operator ("KV heads 2", "layers.1.mixer"), and
    whether fewer of them than TP ranks may be copied (KV heads and Mamba-2 groups may, as
    tensor_parallel does; query heads, channels and vocab rows must divide)."""
    from megaxatl.models.mamba import Mamba
    from megaxatl.models.mamba2 import Mamba2
    from megaxatl.models.mlp import MLP

    if name in ("embed.weight", "lm_head.weight"):
        return f"padded vocab size {size}", name, False
    where, mod = name, None
    while "." in where:  # the nearest enclosing mixer / MLP
        where = where.rsplit(".", 1)[0]
        m = model.get_submodule(where)
        if isinstance(m, (Mamba, Mamba2, MLP)) or hasattr(m, "n_kv_heads"):
            mod = m
            break
    if isinstance(mod, Mamba2) and units is not None:
        groups = units == mod.n_groups and units != mod.n_heads
        return f"Mamba-2 {'groups' if groups else 'heads'} {units}", where, groups
    if isinstance(mod, Mamba):
        return f"Mamba d_inner {mod.d_inner}", where, False
    if isinstance(mod, MLP):
        return f"MLP width {size}", where, False
    if mod is not None and units is not None:
        kv = units == mod.n_kv_heads and units != mod.n_heads
        return f"{'KV heads' if kv else 'heads'} {units}", where, kv
    return (f"{units} units" if units is not None else f"{size} channels"), name, False


def check_layout(model_cfg, tp: int, pp: int) -> Layout:
    """The layout of `model_cfg` (a ModelConfig or Config) at tp x pp, from a meta-device model:
    ValueError, one line naming every size that does not divide, when it cannot be split."""
    from megaxatl.models import build
    from megaxatl.parallel.stages import stage_bounds
    from megaxatl.parallel.tp_rules import model_rules

    model_cfg = getattr(model_cfg, "model", model_cfg)
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
    with torch.device("meta"):
        model = build(model_cfg)
    rules = model_rules(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in shapes if k not in rules]
    if missing:
        raise ValueError(f"no tensor-parallel rule for {missing[:3]} (add them to megaxatl/parallel/tp_rules.py)")
    bad: dict[str, list[str]] = {}
    for key, shape in shapes.items():
        rule = rules[key]
        if not isinstance(rule, Shard):
            continue
        for i, size in enumerate(rule.pieces or (shape[rule.dim],)):
            units = rule.units[i] if rule.units else None
            count = size if units is None else units
            if count % tp:
                what, where, copyable = _describe(model, key, size, units)
                if not (copyable and tp % count == 0) and where not in bad.setdefault(what, []):
                    bad[what].append(where)
    if bad:
        parts = [f"{what} ({where[0]}{f' and {len(where) - 1} more' if len(where) > 1 else ''})"
                 for what, where in bad.items()]
        raise ValueError(f"tp={tp} does not divide: {', '.join(parts)} "
                         "(KV heads and Mamba-2 groups may instead divide tp)")
    for key, shape in shapes.items():  # the rules' own checks (whole units per piece)
        for r in range(tp):
            local_chunks(key, rules[key], shape, r, tp)
    try:
        bounds = stage_bounds(model_cfg, pp)
    except ValueError as e:
        raise ValueError(f"pp={pp}: {e}") from None
    return Layout(tp, pp, rules, shapes, bounds)


# ---- one process writing a whole layout, one source tensor at a time --------------------------

class TensorSource(Protocol):
    """Where full global tensors come from (a model folder, a DCP checkpoint, a state dict)."""

    def entries(self) -> dict[str, tuple[Shape, torch.dtype]]: ...

    def read(self, key: str) -> torch.Tensor: ...


class _Aborted(Exception):
    pass


class _Feed:
    """Hands each virtual rank's writer thread its chunks in order, one source tensor at a time."""

    def __init__(self, n: int):
        self._queues = [queue.SimpleQueue() for _ in range(n)]
        self._cond = threading.Condition()
        self._pending = 0
        self.error: BaseException | None = None

    def put(self, items: list[tuple[int, tuple, torch.Tensor]]) -> None:
        with self._cond:
            self._pending += len(items)
        for v, tag, t in items:
            self._queues[v].put((tag, t))

    def take(self, v: int) -> tuple[tuple, torch.Tensor]:
        item = self._queues[v].get()
        if item is None:
            raise _Aborted()
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()
        return item

    def wait(self) -> None:
        """Until every chunk handed out was taken (so the next source tensor may be read)."""
        with self._cond:
            while self._pending and self.error is None:
                self._cond.wait()
            if self.error is not None:
                raise self.error

    def fail(self, e: BaseException) -> None:
        with self._cond:
            self.error = self.error or e
            self._cond.notify_all()

    def abort(self) -> None:
        for q in self._queues:
            q.put(None)


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc; elsewhere a no-op). Chunks up to 32 MiB come
    from malloc's heap once its adaptive mmap threshold has risen, and freed from the writer
    threads they would stay there: the process would grow towards the size of the data written."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def write_layout(path: str | Path, source: TensorSource, layout: Layout) -> tuple[int, int]:
    """Write `source` as a DCP checkpoint at `layout` from this one process, as tp * pp ranks would
    have (file `__{stage * tp + tp_rank}_0.distcp` each). -> (tensors, bytes written).

    DCP's FileSystemWriter writes each virtual rank's file in its own thread; this thread reads
    one source tensor, hands every rank its chunks of it, and waits until they are taken before
    reading the next, so memory holds about one tensor (plus its chunks) at a time."""
    path = Path(path)
    entries = source.entries()
    n = layout.tp * layout.pp
    per_rank: list[list[tuple[str, Chunk]]] = [[] for _ in range(n)]
    owners: dict[str, list[tuple[int, Chunk]]] = {}
    for key, (shape, _) in entries.items():
        stage = layout.stage_of(key)
        for r in range(layout.tp):
            for c in local_chunks(key, layout.rules[key], shape, r, layout.tp):
                if c.owner:
                    per_rank[stage * layout.tp + r].append((key, c))
                    owners.setdefault(key, []).append((stage * layout.tp + r, c))
    feed = _Feed(n)

    def fetcher(v: int):
        stash: dict[tuple, torch.Tensor] = {}

        def fetch(key: str, chunk: Chunk, index: MetadataIndex) -> torch.Tensor:
            want = (key, tuple(index.offset))
            while want not in stash:  # chunks arrive in plan order; stash any that do not
                tag, t = feed.take(v)
                stash[tag] = t
            return stash.pop(want)
        return fetch

    planners = [_ChunkSavePlanner(per_rank[v], {k: entries[k] for k, _ in per_rank[v]}, fetcher(v), release_written=True)
                for v in range(n)]
    writer = _Writer(path, sync_files=False, overwrite=False, per_thread_copy_ahead=0)
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    local_plans = []
    for v, planner in enumerate(planners):
        planner.set_up_planner({}, writer.storage_meta(), v == 0)
        local_plans.append(writer.prepare_local_plan(planner.create_local_plan()))
    global_plans, metadata = planners[0].create_global_plan(local_plans)
    global_plans = writer.prepare_global_plan(global_plans)

    results: list = [None] * n

    def run(v: int) -> None:
        try:
            results[v] = writer.write_data(planners[v].finish_plan(global_plans[v]), planners[v]).value()
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            feed.fail(e)

    threads = [threading.Thread(target=run, args=(v,), daemon=True, name=f"dcp-writer-{v}") for v in range(n)]
    for t in threads:
        t.start()
    nbytes = 0
    try:
        for key, (shape, dtype) in entries.items():
            full = source.read(key)
            if tuple(full.shape) != tuple(shape) or full.dtype != dtype:
                raise CheckpointError(f"'{key}': read {tuple(full.shape)} {full.dtype}, its index says {shape} {dtype}")
            items = [(v, (key, tuple(c.box(shape)[0])), c.of_global(full).clone(memory_format=torch.contiguous_format))
                     for v, c in owners.get(key, [])]
            nbytes += sum(t.numel() * t.element_size() for _, _, t in items)
            del full
            feed.put(items)
            del items
            feed.wait()
            _trim_heap()
    except BaseException:
        feed.abort()
        for t in threads:
            t.join()
        raise
    for t in threads:
        t.join()
    if feed.error is not None:
        raise feed.error
    writer.finish(metadata, results)
    return len(entries), nbytes


# ---- the sharded model folder -----------------------------------------------------------------

def read_shards_meta(path: str | Path) -> dict:
    f = Path(path) / SHARDS_JSON
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (not a megaxatl sharded model folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    if meta.get("version") != 1:
        raise CheckpointError(f"{f}: version {meta.get('version')!r} is not supported (expected 1)")
    return meta


def verify_sharded_dir(path: str | Path) -> dict:
    """Check every file's checksum against shards.json. -> the folder's shards.json."""
    path = Path(path)
    meta = read_shards_meta(path)
    for rel, digest in sorted(meta.get("sha256", {}).items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: shard file missing (listed in {path / SHARDS_JSON})")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (corrupt or modified file)")
    return meta


SHARDED_FOLDER = "a megaxatl sharded model folder (shards.json)"


def is_sharded_dir(path: str | Path) -> bool:
    """Whether `path` is a sharded model folder (what --overwrite may replace with another one)."""
    return has_format(path, SHARDS_JSON, FORMAT)


def save_sharded_dir(out: str | Path, source: TensorSource, layout: Layout, config: dict,
                     meta: dict | None = None, tokenizer_dir: str | Path | None = None,
                     overwrite: bool = False, extra_files: dict[str, str] | None = None,
                     replaceable=is_sharded_dir, kind: str = SHARDED_FOLDER) -> tuple[int, int]:
    """Write a sharded model folder (DCP files at `layout`, shards.json, tokenizer/, and any
    `extra_files` {name: text} such as a transfer's report.json) atomically. -> (tensors, bytes).
    Never replaces an existing folder unless `overwrite`, and then only one that is `replaceable`
    (fsutil.check_output)."""
    with atomic_dir(out, overwrite, replaceable=replaceable, kind=kind) as tmp:
        tensors, nbytes = write_layout(tmp, source, layout)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _write_shards_json(tmp / SHARDS_JSON, meta, layout.tp, layout.pp, config,
                           {f: sha256_file(tmp / f) for f in files})
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    return tensors, nbytes
