"""The model folder: full weights with global keys, plus our metadata. Written atomically.

Layout of a model folder (a `megaxatl transfer` output, an exported training checkpoint):

    model.safetensors   every parameter under its global name (layers.{i}...), any TP/PP layout
    meta.json           {"format": "megaxatl-model", "version": 1, "config": {...}, "step": int,
                         "transferred": [param names copied from a donor], "report": {...},
                         "sha256": {"model.safetensors": "..."}}
    tokenizer/          the donor's tokenizer files, when there is one

A folder appears complete or not at all: everything is written into a temporary sibling, fsynced,
then renamed into place; an existing folder is only replaced when `overwrite` is set, and then
the old one is moved aside first and removed only after the new one is in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megaxatl.fsutil import atomic_dir, has_format, sha256_file

FORMAT = "megaxatl-model"
WEIGHTS = "model.safetensors"
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


MODEL_FOLDER = "a megaxatl model folder (meta.json)"


def is_model_dir(path: str | Path) -> bool:
    """Whether `path` is a model folder (what --overwrite may replace with another one)."""
    return has_format(path, META, FORMAT)


def save_model_dir(out: str | Path, state_dict: dict[str, torch.Tensor], meta: dict,
                   tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                   extra_files: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_dir(out, overwrite, replaceable=is_model_dir, kind=MODEL_FOLDER) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        full = {"format": FORMAT, "version": 1, **meta, "sha256": {WEIGHTS: sha256_file(tmp / WEIGHTS)}}
        (tmp / META).write_text(json.dumps(full, indent=2) + "\n")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model folder (missing or not a directory)")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing (not a megaxatl model folder)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: corrupt JSON ({e.msg} at line {e.lineno})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_model_dir(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state_dict, meta). Verifies the recorded checksum unless verify=False."""
    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    expected = meta.get("sha256", {}).get(WEIGHTS)
    if verify and expected and sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: checksum mismatch (corrupt or modified file)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable ({e})") from None
    return state, meta


def load_model(path: str | Path, verify: bool = True):
    """Build the model from the folder's stored config and load its weights strictly."""
    from megaxatl.config import config_from_dict
    from megaxatl.models import build

    state, meta = load_model_dir(path, verify)
    cfg = config_from_dict(meta["config"], f"{path}/{META}")
    model = build(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{Path(path) / WEIGHTS}: does not fit its config "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model, cfg, meta
