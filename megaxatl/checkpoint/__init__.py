"""Checkpoint formats: the model folder (full weights, global keys), sharded weights (DCP, any
TP x PP layout) and training checkpoints."""

from megaxatl.checkpoint.model_dir import (
    CheckpointError,
    load_model,
    load_model_dir,
    read_meta,
    save_model_dir,
)

# the sharded format pulls in torch.distributed.checkpoint (most of a second): imported on first use
_SHARDED = ("ShardedCheckpoint", "check_layout", "checkpoint_keys", "iter_full", "load_sharded", "local_chunks",
            "read_full", "save_sharded", "save_sharded_dir", "seal_sharded", "verify_sharded_dir", "write_layout")


def __getattr__(name: str):
    if name in _SHARDED:
        from megaxatl.checkpoint import sharded

        return getattr(sharded, name)
    if name == "open_model":
        from megaxatl.checkpoint.reshard import open_model

        return open_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CheckpointError", "load_model", "load_model_dir", "open_model", "read_meta", "save_model_dir", *_SHARDED]
