"""The trainer's view of the data: the train and val loaders built from `data.*`.

Shards come from `megaxatl prepare-data` (megaxatl/data). Checks made here, before any step:
the shards' seq_len equals `data.seq_len` (the loader checks), the shards' tokenizer is the
model's (when the model has one: a transfer output's or donor's tokenizer), and the shards'
vocabulary fits the model's. Every token id is then checked as its sample is read (the loader:
cheap, and also where a shard too large to hash at start-up is corrupt).
"""

from __future__ import annotations

from pathlib import Path

from megaxatl.config import Config, ConfigError


def expected_tokenizer_id(tokenizer_dir: str | None) -> str | None:
    if not tokenizer_dir:
        return None
    from megaxatl.data import tokenizer_id

    return tokenizer_id(tokenizer_dir)


def build_loaders(cfg: Config, dp_rank: int, dp_world: int, tokenizer_dir: str | None, source: str = ""):
    """-> (train loader, val loader or None, manifest)."""
    from megaxatl.data import build_loader, read_manifest

    d = cfg.data
    if d.access == "stream":
        from megaxatl.data.stream import build_stream_loader as build_loader  # noqa: F811 - same interface
        from megaxatl.data.stream import read_stream_manifest as read_manifest  # noqa: F811
    if not d.train_shards:
        raise ConfigError(source, "data.train_shards", "training needs a shard folder (megaxatl prepare-data)")
    manifest = read_manifest(d.train_shards)
    vocab = manifest.get("vocab_size") or manifest["tokenizer"].get("vocab_size")
    if vocab and vocab > cfg.model.vocab_size:
        raise ConfigError(source, "model.vocab_size",
                          f"{cfg.model.vocab_size} is smaller than the shards' tokenizer vocabulary {vocab} "
                          f"({Path(d.train_shards) / 'manifest.json'})")
    tok_id = expected_tokenizer_id(tokenizer_dir)
    common = dict(micro_batch_size=d.micro_batch_size, seq_len=d.seq_len, dp_rank=dp_rank, dp_world=dp_world,
                  seed=d.seed, expected_tokenizer_id=tok_id, vocab_size=cfg.model.vocab_size)
    workers = {} if d.access == "stream" else {"num_workers": d.num_workers}  # streaming: a prefetch thread
    train = build_loader(d.train_shards, "train", **workers, **common)
    val_dir = d.val_shards or d.train_shards
    val_manifest = read_manifest(val_dir)
    val = None
    if val_manifest["splits"].get("val", {}).get("num_samples", 0) > 0:
        val = build_loader(val_dir, "val", **({} if d.access == "stream" else {"num_workers": 0}), **common)
    return train, val, manifest


def bytes_per_token(manifest: dict, split: str = "val") -> float | None:
    info = manifest["splits"].get(split) or manifest["splits"].get("train") or {}
    return info.get("bytes_per_token")
