"""Data pipeline: text -> tokens -> packed webdataset shards -> resumable DP-sharded loader.

    prepare_data(inputs, out_dir, tokenizer | train_spm=V, seq_len, ...) -> manifest  (prepare.py)
    build_loader(shard_dir, split, micro_batch_size, seq_len, dp_rank, dp_world, seed, ...)
        -> ShardLoader yielding {"input_ids", "labels", "num_bytes"}               (loader.py)
    build_stream_loader(location URL, split, ...) -> StreamLoader, the same interface, streamed
        through webdataset from local paths, pipe: commands, http(s)                (stream.py)
    tokenizer_id(<HF tokenizer dir | .model | loaded tokenizer>) -> "sha256:..."    (tokenizer.py)

The shard format is described in format.py. Exports are lazy so that tokenization worker
processes (which import megaxatl.data.tokenizer) never import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "format", "read_manifest": "format", "IGNORE_INDEX": "format",
    "prepare_data": "prepare",
    "build_loader": "loader", "ShardDataset": "loader", "ShardLoader": "loader",
    "verify_shards": "loader", "IndexPermutation": "loader",
    "build_stream_loader": "stream", "StreamLoader": "stream",
    "tokenizer_id": "tokenizer", "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megaxatl.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megaxatl.data' has no attribute {name!r}")
