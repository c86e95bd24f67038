"""Every input of a training run checked before anything large is built.

A wrong data path found after the model exists costs the whole build (minutes and tens of GB per
rank at billions of parameters). So the trainer calls `check_inputs` first: it reads only file
headers and small JSON files, and builds no parameter storage. What it checks:

- the output folder: not a file, and creatable / writable;
- `train.init_from`: a model folder whose weights (safetensors headers) fit this config's model,
  name for name and shape for shape (compared against the model built on the meta device);
- `transfer.donor`: an existing donor (its headers and config; the transfer plan itself is checked
  by `from_donor` before any copy);
- the data: both shard folders' manifests, seq_len, vocabulary, and the tokenizer against the
  model's (the init folder's, the donor's, or the resumed checkpoint's).

- the kernel backends (`check_kernels`, first of all): the config's `kernels` section applied, the
  backend of every op chosen for this rank's device; in strict mode a requested backend that
  cannot run stops the run here, in one line naming the op and why.

The layout against the world size is checked by the trainer before this (parallel_state).
Returns the tokenizer folder the run uses, so the loaders are built from the same answer.
"""

from __future__ import annotations

import os
from pathlib import Path

from megaxatl.config import Config, ConfigError


def check_output(cfg: Config, source: str = "") -> None:
    out = Path(cfg.train.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(source, "train.out_dir", f"{out} exists and is not a folder")
    probe = out
    while not probe.exists():  # the nearest existing ancestor must let us create the folder
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(source, "train.out_dir", f"{out}: {probe} is not a writable folder")


def check_kernels(cfg: Config, device, source: str = "") -> dict[str, dict[str, str]]:
    """Apply `cfg.kernels` and choose every op's backend on `device`. -> {"kernels": {op: backend},
    and "kernel_fallbacks": {op: what was requested and why it does not run} when any fell back}
    (the start event's fields). Strict and a requested backend that cannot run: ConfigError."""
    from megaxatl.kernels import BackendError, startup_report

    try:
        cfg.kernels.apply()
        choices = startup_report(device)
    except BackendError as e:
        raise ConfigError(source, "kernels", str(e)) from None
    out = {"kernels": {op: c.backend for op, c in choices.items()}}
    fallbacks = {op: f"{c.requested} by {c.source}: {c.reason}" for op, c in choices.items() if c.reason}
    if fallbacks:
        out["kernel_fallbacks"] = fallbacks
    return out


def meta_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every parameter's global name and full shape, from the model built on the meta device."""
    import torch

    from megaxatl.models import build

    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in build(cfg).named_parameters()}


INIT_KINDS = ("model folder", "sharded model folder", "training checkpoint")


def open_init(path: Path):
    """`train.init_from` -> (its reshard.Input, a TensorSource over its weights). Only headers and
    the index are read here; no checksum yet (each file is verified when it is first read)."""
    from megaxatl.checkpoint import CheckpointError
    from megaxatl.checkpoint.reshard import SafetensorsSource, detect_input
    from megaxatl.checkpoint.sharded import ShardedCheckpoint

    inp = detect_input(path)
    if inp.kind not in INIT_KINDS:
        raise CheckpointError(f"{inp.path}: a {inp.kind} cannot initialise a run (convert it with "
                              "`megaxatl reshard` first)")
    if inp.kind == "model folder":
        return inp, SafetensorsSource(inp.path, verify=False)
    folder = inp.path if inp.kind == "sharded model folder" else inp.path / "weights"
    return inp, ShardedCheckpoint(folder)


def check_init_dir(cfg: Config, path: Path) -> str | None:
    """-> its tokenizer folder (or None). Raises CheckpointError naming the first misfit."""
    from megaxatl.checkpoint import CheckpointError

    inp, source = open_init(path)
    have = {k: tuple(v[0]) for k, v in source.entries().items()}
    want = meta_shapes(cfg)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{path}: its weights do not fit this config's model section "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, shape in want.items():
        if have[name] != shape:
            raise CheckpointError(f"{path}: its weights do not fit this config's model section: {name} is "
                                  f"{have[name]} in the folder, {shape} in this model")
    return str(inp.tokenizer_dir) if inp.tokenizer_dir else None


def donor_tokenizer(name_or_path: str) -> str | None:
    from megaxatl.assets.donors import resolve_donor
    from megaxatl.donors import open_donor

    donor = open_donor(resolve_donor(name_or_path))  # headers and config only
    return str(donor.tokenizer_dir) if donor.tokenizer_dir else None


def check_data(cfg: Config, tokenizer_dir: str | None, source: str = "") -> None:
    """The manifests, seq_len, vocabulary and tokenizer of both shard folders (no shard is read)."""
    from megaxatl.data import DataError, read_manifest
    from megaxatl.train.data import expected_tokenizer_id

    d = cfg.data
    if not d.train_shards:
        raise ConfigError(source, "data.train_shards", "training needs a shard folder (megaxatl prepare-data)")
    tok_id = expected_tokenizer_id(tokenizer_dir)
    for key, folder in (("data.train_shards", d.train_shards), ("data.val_shards", d.val_shards)):
        if not folder:
            continue
        m = read_manifest(folder)
        where = Path(folder) / "manifest.json"
        if m["seq_len"] != d.seq_len:
            raise DataError(f"{where}: shards hold seq_len {m['seq_len']}, data.seq_len is {d.seq_len}")
        vocab = m.get("vocab_size") or m["tokenizer"].get("vocab_size")
        if vocab and vocab > cfg.model.vocab_size:
            raise ConfigError(source, "model.vocab_size", f"{cfg.model.vocab_size} is smaller than the shards' "
                                                          f"tokenizer vocabulary {vocab} ({where})")
        if tok_id is not None and m["tokenizer"].get("id") != tok_id:
            raise DataError(f"{where}: shards were tokenized with tokenizer {m['tokenizer'].get('id')} "
                            f"({m['tokenizer'].get('name')}), but the model's tokenizer is {tok_id} "
                            f"({tokenizer_dir}); re-run prepare-data with the model's tokenizer")
        if key == "data.train_shards" and "train" not in m["splits"]:
            raise DataError(f"{where}: no 'train' split")


def check_inputs(cfg: Config, source: str = "", saved: dict | None = None) -> str | None:
    """All of the above, in order; saved: the meta of the checkpoint being resumed, if any.
    -> the tokenizer folder of the model being trained (None when it has none)."""
    check_output(cfg, source)
    if saved is not None:
        tokenizer_dir = saved.get("tokenizer_dir")
    elif cfg.train.init_from:
        tokenizer_dir = check_init_dir(cfg, Path(cfg.train.init_from))
    elif cfg.transfer.donor:
        tokenizer_dir = donor_tokenizer(cfg.transfer.donor)
    else:
        tokenizer_dir = None
    check_data(cfg, tokenizer_dir, source)
    return tokenizer_dir
