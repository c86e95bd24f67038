"""Checkpoint formats: the model folder (full weights, global keys) and training checkpoints."""

from megaxatl.checkpoint.model_dir import (
    CheckpointError,
    load_model,
    load_model_dir,
    read_meta,
    save_model_dir,
)

__all__ = ["CheckpointError", "load_model", "load_model_dir", "read_meta", "save_model_dir"]
