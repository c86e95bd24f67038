"""Checkpoint formats: the model folder (full weights, global keys) and training checkpoints."""

from megaxatl.checkpoint.model_dir import (
    CheckpointError,
    atomic_dir,
    load_model,
    load_model_dir,
    read_meta,
    save_model_dir,
    sha256_file,
)

__all__ = ["CheckpointError", "atomic_dir", "load_model", "load_model_dir", "read_meta", "save_model_dir", "sha256_file"]
