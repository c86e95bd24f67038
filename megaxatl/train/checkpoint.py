"""Training checkpoints: DeepSpeed's engine state plus ours, complete or absent, with retention.

Layout under `<out_dir>/checkpoints/`:

    latest                      the tag of the newest complete checkpoint (DeepSpeed's convention,
                                so DeepSpeed's own tools and zero_to_fp32.py find it too)
    step_00000500/              one checkpoint (tag):
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   engine.save_checkpoint:
                                model, optimizer (every ZeRO stage's partitions), LR scheduler
        megaxatl_rank{r}.pt     per rank: data loader state, RNG states (python, numpy, torch[, cuda])
        weights/                every rank's TP / PP shard of the fp32 weights under global keys
                                (torch.distributed.checkpoint, checkpoint/sharded.py): what the
                                export, `megaxatl reshard` and other layouts read
        megaxatl.json           rank 0, written last: step, freeze policy state, config, transfer
                                report / transferred names, counters, world size
    .tmp-step_00000500/         a checkpoint being written (removed on the next start)

Atomicity: every rank writes into `.tmp-<tag>`; after a barrier rank 0 fsyncs it, renames it to
`<tag>` and only then replaces `latest` (write a temp file + os.replace), then prunes to keep_last.
A crash at any point leaves `latest` naming a complete checkpoint. Needs a filesystem all ranks
share (one node, or a cluster filesystem), as DeepSpeed's own checkpointing does.

A damaged checkpoint (a truncated or corrupt `.pt` file, a bad megaxatl.json) is a
CheckpointError (a ValueError) naming the file, raised when loading; nothing falls back silently.
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

from megaxatl.checkpoint import CheckpointError
from megaxatl.fsutil import fsync_dir, fsync_tree

META = "megaxatl.json"
WEIGHTS_DIR = "weights"  # fp32 weights under global keys, DCP format: readable at any layout
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
    """Checkpoint folder `path` -> its megaxatl.json."""
    f = Path(path) / META
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: corrupt checkpoint metadata ({e}); {_advice(Path(path))}") from None


def _advice(path: Path) -> str:
    return (f"move {path.name} aside (or write an earlier tag into {path.parent / LATEST}) "
            "to resume from an earlier checkpoint")


def _corrupt_file(path: Path) -> Path | None:
    """The first `.pt` file of a checkpoint folder that is not a whole zip archive (torch.save's
    format: a truncated or overwritten file fails here), or None."""
    import zipfile

    for f in sorted(Path(path).glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                if z.testzip() is not None:
                    return f
        except (zipfile.BadZipFile, OSError, EOFError):
            return f
    return None


def _damaged(path: Path, err: BaseException, file: Path | None = None) -> CheckpointError | None:
    bad = file if file is not None else _corrupt_file(path)
    if bad is None:
        return None
    first = (str(err).strip().splitlines() or [""])[0]
    return CheckpointError(f"{bad}: corrupt checkpoint file ({type(err).__name__}: {first}); {_advice(path)}")


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the newest complete tag."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if tag and is_complete(root / tag):
            return root / tag
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and is_complete(p))
    return tags[-1] if tags else None


def clean_partial(root: Path) -> None:
    """Rank 0 at start: remove checkpoints a crash left half-written."""
    if Path(root).is_dir():
        for p in Path(root).iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def save(engine, root: Path, step: int, meta: dict, rank_state: dict, keep_last: int,
         write_weights=None) -> Path:
    """Collective: every rank calls it. -> the checkpoint folder. write_weights(folder): a
    collective writing the layout-free weights into `<tmp>/weights` (see sharded.py)."""
    root = Path(root)
    rank = dist.get_rank()
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    tmp = root / tmp_tag
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, tmp / f"megaxatl_rank{rank}.pt")
    if write_weights is not None:
        write_weights(tmp / WEIGHTS_DIR)
    dist.barrier()  # every rank's files are written
    if rank == 0:
        (tmp / META).write_text(json.dumps({**meta, "step": step, "tag": tag}, indent=1) + "\n")
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
        pointer_tmp = root / f"{TMP_PREFIX}{LATEST}"
        pointer_tmp.write_text(tag + "\n")
        with open(pointer_tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(pointer_tmp, root / LATEST)
        fsync_dir(root)
        prune(root, keep_last, protect=tag)
    dist.barrier()
    return root / tag


def prune(root: Path, keep_last: int, protect: str) -> None:
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in tags[:-keep_last] if keep_last > 0 else []:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, path: Path, world_size: int, zero_stage: int) -> tuple[dict, dict]:
    """Collective. Restore the engine from checkpoint `path`; -> (our meta, this rank's state)."""
    path = Path(path)
    meta = read_meta(path)
    saved_world = meta.get("world_size", world_size)
    if saved_world != world_size and zero_stage > 0:
        raise RuntimeError(
            f"{path}: written by {saved_world} data-parallel ranks, now {world_size}: ZeRO partitions "
            f"are per rank; resume with {saved_world} ranks or convert it with DeepSpeed's ds_to_universal")
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as e:  # DeepSpeed's message names no file: find the damaged one
        raise (_damaged(path, e) or e) from e
    if load_path is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
    rank = dist.get_rank()
    rank_file = path / f"megaxatl_rank{rank}.pt"
    if not rank_file.is_file():  # fewer ranks saved (ZeRO-0 resumed wider): rank 0's data position
        rank_file = path / "megaxatl_rank0.pt"
    try:
        rank_state = torch.load(rank_file, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _damaged(path, e, rank_file) from e
    return meta, rank_state
