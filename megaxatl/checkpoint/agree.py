"""Errors agreed over all ranks.

A checkpoint is read and written by every rank, each its own files, between collectives. When
one rank fails (a corrupt shard only it reads, a disk that fills while it writes), the others must
not wait in the next collective for a rank that has gone: around such a phase every rank learns
whether any failed, and all raise. A rank that did not fail raises the first failing rank's error
(the same class: an OSError with its errno and path, a CheckpointError with its message), so every
rank prints the same line and exits with the same code.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist

from megaxatl.checkpoint.model_dir import CheckpointError

CAUGHT = (CheckpointError, OSError)


def _portable(e: BaseException) -> tuple:
    """What another rank needs to raise the same error (plain data: it crosses the wire)."""
    if isinstance(e, OSError):
        return ("os", e.errno, e.strerror or str(e), e.filename)
    return ("checkpoint", str(e))


def _rebuild(rank: int, info: tuple) -> BaseException:
    if info[0] == "os":
        _, errno, strerror, filename = info
        return OSError(errno, f"{strerror} (on rank {rank})", filename)  # OSError(errno) picks the subclass
    return CheckpointError(f"{info[1]} (on rank {rank})")


def agree_on(error: BaseException | None, group=None) -> None:
    """Collective over `group`: raise `error` (this rank's, or None) or, when it is None, the first
    other rank's; return only when no rank has one."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        if error is not None:
            raise error
        return
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, None if error is None else _portable(error), group=group)
    if error is not None:
        raise error
    for rank, info in enumerate(everyone):
        if info is not None:
            raise _rebuild(rank, info)


@contextmanager
def agreed(caught: tuple[type[BaseException], ...] = CAUGHT):
    """Collective, around a phase each rank runs on its own: an error of a `caught` class on any
    rank ends the block on every rank with agree_on's error."""
    error = None
    try:
        yield
    except caught as e:
        error = e
    agree_on(error)
