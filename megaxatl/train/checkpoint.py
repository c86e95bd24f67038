"""Training checkpoints: DeepSpeed's engine state plus ours, complete or absent, with retention.

Layout under `<out_dir>/checkpoints/`:

    latest                      the tag of the newest complete checkpoint (DeepSpeed's convention,
                                so DeepSpeed's own tools and zero_to_fp32.py find it too)
    step_00000500/              one checkpoint (tag):
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   engine.save_checkpoint:
                                model, optimizer (every ZeRO stage's partitions), LR scheduler
                                (left out with train.save_deepspeed_state false)
        megaxatl_rank{r}.pt     per rank: data loader state, RNG states (python, numpy, torch[, cuda])
        weights/                every rank's TP / PP shard of the fp32 weights under global keys
                                (torch.distributed.checkpoint, checkpoint/sharded.py): what the
                                export, `megaxatl reshard` and other layouts read
        optimizer/              the AdamW moments the same way (train/portable.py), when
                                train.portable_optimizer and the optimizer allow
        megaxatl.json           rank 0, written last: step, freeze policy state, config, transfer
                                report / transferred names, counters, layout (tp, pp, dp, ZeRO
                                stage, dtype), whether optimizer/ was written, and the seal: every
                                other file's sha256 (checkpoint/seal.py)
    .tmp-step_00000500/         a checkpoint being written (removed on the next start)

Atomicity: every rank writes into `.tmp-<tag>`; the ranks hash its files (each a share), rank 0
writes megaxatl.json with the digests, fsyncs, renames the folder to `<tag>` and only then replaces
`latest` (write a temp file + os.replace), then prunes to keep_last. A crash at any point leaves
`latest` naming a complete checkpoint. A failed write (a full disk) on any rank stops every rank
with that rank's OSError naming the file (checkpoint/agree.py), and the temporary folder is
removed: the previous checkpoint and `latest` are as they were. Needs a filesystem all ranks share
(one node, or a cluster filesystem), as DeepSpeed's own checkpointing does.

Verification: a resume first checks every file against the seal (`resume_point`, the ranks
sharing the hashing), the DCP files of weights/ and optimizer/ included (through their shards.json)
though a same-layout resume reads none of them: a checkpoint called verified (resumed from, named
as the last good one) has had every file hashed. A mismatch, a missing or an unlisted file is a
CheckpointError naming the file and the newest checkpoint that does verify. DeepSpeed's files are then read weights-only
(train/deepspeed_files.py), ours with torchfile.load: nothing in a checkpoint can run code.

Resuming: at the layout that wrote it, DeepSpeed's own files restore everything exactly. At another
one (`layout_change` says which), or from a checkpoint saved without them, the trainer reads
weights/ (and optimizer/) instead, see train/portable.py; loader positions are global (consumed
samples), so rank 0's serves every rank.

A damaged checkpoint is a CheckpointError (a ValueError) naming the file; nothing falls back
silently to an earlier one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megaxatl import torchfile
from megaxatl.checkpoint import CheckpointError
from megaxatl.checkpoint.agree import agreed
from megaxatl.checkpoint.seal import FILES, check_seal, expand, files_to_seal, first_mismatch, sealed, unlisted
from megaxatl.fsutil import fsync_dir, fsync_tree, naming, sha256_file, write_atomic
from megaxatl.train.deepspeed_files import recorded_saves, weights_only_loads

META = "megaxatl.json"
WEIGHTS_DIR = "weights"  # fp32 weights under global keys, DCP format: readable at any layout
OPTIMIZER_DIR = "optimizer"  # AdamW moments, the same way
LATEST = "latest"
TMP_PREFIX = ".tmp-"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_meta(path: Path) -> dict:
    """Checkpoint folder `path` -> its megaxatl.json (its seal checked)."""
    f = Path(path) / META
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: corrupt checkpoint metadata ({e}); {_advice(Path(path))}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: corrupt checkpoint metadata (not a JSON object); {_advice(Path(path))}")
    try:
        check_seal(meta, f)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_advice(Path(path))}") from None
    return meta


def _advice(path: Path, good: Path | None | str = "") -> str:
    """How to resume from an earlier checkpoint; `good`: the newest that verifies (None: there is
    none; "": not looked for)."""
    if good is None:
        return (f"no checkpoint in {path.parent} verifies: move {path.name} aside (or set train.resume false) "
                "to start afresh")
    where = f"the newest checkpoint that verifies is {good.name}: write {good.name} into {path.parent / LATEST}" \
        if good else f"write an earlier tag into {path.parent / LATEST}"
    return f"{where} (or move {path.name} aside) to resume from an earlier checkpoint"


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


def _tags(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.startswith("step_") and is_complete(p))


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the newest complete tag
    (unverified: see resume_point)."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if tag and "/" not in tag and is_complete(root / tag):
            return root / tag
    tags = _tags(root)
    return tags[-1] if tags else None


def _rank0_list(fn):
    """Collective: rank 0's fn() on every rank (one listing of a shared folder)."""
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _share(names: list[str]) -> list[str]:
    return names[dist.get_rank()::dist.get_world_size()]


def problem(path: Path) -> str | None:
    """Collective: why checkpoint `path` does not verify ('file: why', the same on every rank), or
    None when every file matches its seal. The ranks share the hashing."""
    path = Path(path)

    def check_meta():
        try:
            meta = read_meta(path)
        except CheckpointError as e:
            return str(e).split("; ")[0], None
        # weights/ and optimizer/ too: a checkpoint called verified has had every file hashed
        digests, bad = expand(path, meta[FILES])
        return bad or unlisted(path, digests, exclude=(META,), nested=True), digests

    found, digests = _rank0_list(check_meta)
    if found is None:
        mine = first_mismatch(path, digests, _share(sorted(digests)))
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        found = min((p for p in everyone if p is not None), default=None)
    return found


def newest_verified(root: Path, before: Path | None = None) -> Path | None:
    """Collective: the newest complete checkpoint under `root` (older than `before`) that verifies."""
    root = Path(root)
    tags = _rank0_list(lambda: [p.name for p in _tags(root)] if root.is_dir() else [])
    for tag in reversed(tags):
        if before is not None and tag >= before.name:
            continue
        if problem(root / tag) is None:
            return root / tag
    return None


def resume_point(root: Path) -> Path | None:
    """Collective: the checkpoint to resume from (find_latest's), verified; CheckpointError naming
    the first bad file and the newest checkpoint that verifies when it does not."""
    latest = find_latest(root)
    if latest is None:
        return None
    bad = problem(latest)
    if bad is None:
        return latest
    raise CheckpointError(f"{bad}; {_advice(latest, newest_verified(root, before=latest))}")


def clean_partial(root: Path) -> None:
    """Rank 0 at start: remove checkpoints a crash left half-written."""
    if Path(root).is_dir():
        for p in Path(root).iterdir():
            if p.name.startswith(TMP_PREFIX):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def save(engine, root: Path, step: int, meta: dict, rank_state: dict, keep_last: int,
         write_portable=None, engine_state: bool = True) -> Path:
    """Collective: every rank calls it. -> the checkpoint folder. write_portable(folder) -> dict:
    a collective writing the layout-free state into the (temporary) checkpoint folder; what it
    returns is added to megaxatl.json. engine_state=False: no DeepSpeed files (then the
    layout-free state is the checkpoint; megaxatl.json says so). An I/O failure on any rank is an
    OSError naming the file on every rank, with the temporary folder removed."""
    root = Path(root)
    rank = dist.get_rank()
    tag = tag_for(step)
    tmp = root / (TMP_PREFIX + tag)
    try:
        with agreed():
            if rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        with agreed(), naming(tmp):
            if engine_state:
                with recorded_saves() as failed:
                    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
                if failed:
                    raise failed[0]
            torchfile.save(rank_state, tmp / f"megaxatl_rank{rank}.pt")
        meta = {**meta, "engine_state": engine_state}
        if write_portable is not None:
            meta = {**meta, **write_portable(tmp)}  # its writers agree on errors themselves
        names = _rank0_list(lambda: files_to_seal(tmp, exclude=(META,)))
        with agreed():
            mine = {n: sha256_file(tmp / n) for n in _share(names)}
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        with agreed(), naming(tmp):
            if rank == 0:
                digests = {k: v for part in parts for k, v in part.items()}
                _publish(root, tmp, tag, sealed({**meta, "step": step, "tag": tag}, digests), keep_last)
    except BaseException:
        if rank == 0:  # every rank is past its writes: nothing writes into tmp any more
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / tag


def _publish(root: Path, tmp: Path, tag: str, meta: dict, keep_last: int) -> None:
    """Rank 0: megaxatl.json last, the folder renamed into place, then `latest`, then pruning."""
    with naming(tmp / META):
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    fsync_tree(tmp)
    final = root / tag
    if final.exists():  # a re-run that reached the same step: replace the old one
        old = root / f"{TMP_PREFIX}old-{tag}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    write_atomic(root / LATEST, tag + "\n", tmp=root / f"{TMP_PREFIX}{LATEST}")
    prune(root, keep_last, protect=tag)


def prune(root: Path, keep_last: int, protect: str) -> None:
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in tags[:-keep_last] if keep_last > 0 else []:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def layout_of(meta: dict) -> dict:
    """The layout a checkpoint was written at: tp, pp, dp, zero_stage, dtype."""
    par, train = meta["config"]["parallel"], meta["config"]["train"]
    tp, pp = par.get("tp", 1), par.get("pp", 1)
    saved = meta.get("layout") or {"tp": tp, "pp": pp, "dp": meta.get("world_size", 1) // (tp * pp)}
    return {"zero_stage": par.get("zero_stage", 0), "dtype": train.get("dtype", "bf16"), **saved,
            "engine_state": meta.get("engine_state", True)}


def describe_layout(layout: dict) -> str:
    stages = ""
    if layout["pp"] > 1 and layout.get("bounds"):
        stages = ", layers " + " | ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in layout["bounds"])
    return (f"TP {layout['tp']} x PP {layout['pp']} x DP {layout['dp']}, ZeRO-{layout['zero_stage']}, "
            f"{layout['dtype']}{stages}")


def layout_change(saved: dict, now: dict) -> str | None:
    """'<saved> -> <now>' when DeepSpeed's per-rank files cannot restore the run at layout `now`
    (another TP / PP split or stage bounds, ZeRO stage or dtype, or another DP size where the
    optimizer state is partitioned per DP rank); None when they can. `saved` is layout_of(meta)."""
    if not saved.get("engine_state", True):  # written without them: the layout-free state it is
        return f"{describe_layout(saved)} (layout-free checkpoint) -> {describe_layout(now)}"
    same = all(saved[k] == now[k] for k in ("tp", "pp", "zero_stage", "dtype"))
    if saved.get("bounds") is not None and now.get("bounds") is not None:  # '|' moved: other stages
        same = same and [list(b) for b in saved["bounds"]] == [list(b) for b in now["bounds"]]
    # optimizer state partitioned over DP: ZeRO >= 1, and the bf16 optimizer of pipeline stages
    partitioned = now["zero_stage"] > 0 or (now["pp"] > 1 and now["dtype"] == "bf16")
    if same and (saved["dp"] == now["dp"] or not partitioned):
        return None
    return f"{describe_layout(saved)} -> {describe_layout(now)}"


def read_rank_state(path: Path, rank: int) -> dict:
    """This rank's loader / RNG state; rank 0's when the checkpoint has fewer ranks (the loader
    position is global, so any rank's serves)."""
    rank_file = Path(path) / f"megaxatl_rank{rank}.pt"
    if not rank_file.is_file():
        rank_file = Path(path) / "megaxatl_rank0.pt"
    try:
        return torchfile.load(rank_file)
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{rank_file}: unreadable ({type(e).__name__}: {first}); {_advice(Path(path))}") from e


def load(engine, path: Path) -> dict:
    """Collective. Restore the engine from checkpoint `path` (verified by resume_point, written at
    this layout: see layout_change); -> this rank's state. DeepSpeed's files are read weights-only."""
    path = Path(path)
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint of this layout in it")
    return read_rank_state(path, dist.get_rank())
