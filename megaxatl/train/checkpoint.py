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
                                stage, dtype), whether optimizer/ was written
    .tmp-step_00000500/         a checkpoint being written (removed on the next start)

Atomicity: every rank writes into `.tmp-<tag>`; after a barrier rank 0 fsyncs it, renames it to
`<tag>` and only then replaces `latest` (write a temp file + os.replace), then prunes to keep_last.
A crash at any point leaves `latest` naming a complete checkpoint. Needs a filesystem all ranks
share (one node, or a cluster filesystem), as DeepSpeed's own checkpointing does.

Resuming: at the layout that wrote it, DeepSpeed's own files restore everything exactly. At another
one (`layout_change` says which), or from a checkpoint saved without them, the trainer reads
weights/ (and optimizer/) instead, see train/portable.py; loader positions are global (consumed
samples), so rank 0's serves every rank.

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
         write_portable=None, engine_state: bool = True) -> Path:
    """Collective: every rank calls it. -> the checkpoint folder. write_portable(folder) -> dict:
    a collective writing the layout-free state into the (temporary) checkpoint folder; what it
    returns is added to megaxatl.json. engine_state=False: no DeepSpeed files (then the
    layout-free state is the checkpoint; megaxatl.json says so)."""
    root = Path(root)
    rank = dist.get_rank()
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    dist.barrier()
    if engine_state:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    meta = {**meta, "engine_state": engine_state}
    tmp = root / tmp_tag
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    torch.save(rank_state, tmp / f"megaxatl_rank{rank}.pt")
    if write_portable is not None:
        meta = {**meta, **write_portable(tmp)}
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
        return torch.load(rank_file, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _damaged(Path(path), e, rank_file) from e


def load(engine, path: Path) -> dict:
    """Collective. Restore the engine from checkpoint `path` (written at this layout: see
    layout_change; its megaxatl.json is read_meta's); -> this rank's state."""
    path = Path(path)
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as e:  # DeepSpeed's message names no file: find the damaged one
        raise (_damaged(path, e) or e) from e
    if load_path is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
    return read_rank_state(path, dist.get_rank())
