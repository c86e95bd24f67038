"""`megaxatl reshard`: model weights from any folder -> a sharded model folder at tp x pp, or a
model folder (full weights). No model is built beyond a meta-device one for the layout checks.

Inputs, recognised by their files:

    model folder              meta.json + model.safetensors (`megaxatl transfer`, a trained `final/`)
    sharded model folder      shards.json + DCP files (an earlier reshard)
    training checkpoint       megaxatl.json + weights/ (DCP files the trainer wrote with save_sharded)
    DeepSpeed checkpoint      megaxatl.json + DeepSpeed's files, saved at tp = pp = 1: consolidated
                              with DeepSpeed's zero_to_fp32 (ZeRO 1-3) or read from
                              mp_rank_00_model_states.pt (ZeRO 0), weights-only

A training checkpoint's files are checked against its seal (checkpoint/seal.py) before they are
read: every file of a DeepSpeed checkpoint, the weights/ files the seal lists of one with weights/
(there its shards.json, whose DCP files are checked as they are read).

A `checkpoints/` folder with a `latest` file, or that file itself, stands for the checkpoint it
names. Everything is
checked before anything is written (the layout divides the model, the weights fit the config,
the output folder is free: not an input, not holding one, and with --overwrite only a model
folder or sharded model folder), then the output is written atomically, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megaxatl.checkpoint.model_dir import FORMAT as MODEL_FORMAT
from megaxatl.checkpoint.model_dir import META as MODEL_META
from megaxatl.checkpoint.model_dir import MODEL_FOLDER, WEIGHTS, CheckpointError, is_model_dir, read_meta
from megaxatl.checkpoint.seal import check_seal, verify_folder
from megaxatl.checkpoint.sharded import (
    SHARDED_FOLDER,
    SHARDS_JSON,
    Layout,
    ShardedCheckpoint,
    TensorSource,
    check_layout,
    is_sharded_dir,
    read_shards_meta,
    save_sharded_dir,
)
from megaxatl.fsutil import atomic_dir, check_output, sha256_file

TRAIN_META = "megaxatl.json"
CARRIED = ("step", "transferred", "report", "trained_from")  # metadata an output keeps from its input


# ---- sources ------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsSource:
    """A model folder's model.safetensors, read one tensor at a time (checksum checked first)."""

    def __init__(self, folder: Path, verify: bool = True):
        from safetensors import safe_open

        self.file = folder / WEIGHTS
        meta = read_meta(folder)
        if not self.file.is_file():
            raise CheckpointError(f"{self.file}: missing")
        expected = meta.get("sha256", {}).get(WEIGHTS)
        if verify and expected and sha256_file(self.file) != expected:
            raise CheckpointError(f"{self.file}: checksum mismatch (corrupt or modified file)")
        try:
            self._f = safe_open(str(self.file), framework="pt")
            self._entries = {}
            for k in self._f.keys():
                sl = self._f.get_slice(k)
                self._entries[k] = (tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()])
        except Exception as e:  # the safetensors error types vary by version
            raise CheckpointError(f"{self.file}: unreadable ({type(e).__name__}: {e})") from None

    def entries(self) -> dict:
        return dict(self._entries)

    def read(self, key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.file}: cannot read '{key}' ({type(e).__name__}: {e})") from None


class DictSource:
    """Tensors already in memory (a consolidated DeepSpeed checkpoint)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def entries(self) -> dict:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.state.items()}

    def read(self, key: str) -> torch.Tensor:
        return self.state[key].detach().cpu()


class _InOrder:
    """A source's tensors in the model's key order (checked to be exactly the model's)."""

    def __init__(self, source: TensorSource, order: list[str]):
        self.source, entries = source, source.entries()
        self._entries = {k: entries[k] for k in order}

    def entries(self) -> dict:
        return dict(self._entries)

    def read(self, key: str) -> torch.Tensor:
        return self.source.read(key)


# ---- inputs -------------------------------------------------------------------------------------

@dataclass
class Input:
    kind: str                      # "model folder" | "sharded model folder" | "training checkpoint" | "DeepSpeed checkpoint"
    path: Path
    config: dict
    meta: dict = field(default_factory=dict)  # carried into the output's metadata
    tokenizer_dir: Path | None = None
    layout: dict | None = None
    seal: dict | None = None  # a training checkpoint's megaxatl.json (its seal checked)

    def open(self) -> TensorSource:
        if self.kind == "model folder":
            return SafetensorsSource(self.path)
        if self.kind == "sharded model folder":
            return ShardedCheckpoint(self.path)
        if self.kind == "training checkpoint":
            self._verify(sorted(n for n in self.seal["sha256"] if n.startswith("weights/")))
            return ShardedCheckpoint(self.path / "weights")
        self._verify(None)
        return DictSource(_consolidate_deepspeed(self.path, self.config, self.layout))

    def _verify(self, names: list[str] | None) -> None:
        bad = verify_folder(self.path, self.seal, exclude=(TRAIN_META,), names=names)
        if bad is not None:
            raise CheckpointError(bad)


def _json(f: Path) -> dict:
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: corrupt JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return data


def _config_of(meta: dict, f: Path) -> dict:
    cfg = meta.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{f}: has no \"config\" with a \"model\" section")
    return cfg


def _tokenizer(path: Path | None) -> Path | None:
    return path if path is not None and path.is_dir() else None


def detect_input(path: str | Path) -> Input:
    """What kind of weights folder `path` is, and its config and metadata (nothing heavy is read)."""
    path = Path(path)
    if path.is_file() and path.name == "latest":  # DeepSpeed's pointer file: the tag it names
        tag = path.read_text().strip()
        if not tag or not (path.parent / tag).is_dir():
            raise CheckpointError(f"{path}: names {tag!r}, which is not a checkpoint folder beside it")
        path = path.parent / tag
    if not path.is_dir():
        raise CheckpointError(f"{path}: input folder missing (or not a directory)")
    if not (path / TRAIN_META).is_file() and (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if tag and (path / tag).is_dir():
            path = path / tag
    if (path / SHARDS_JSON).is_file():
        meta = read_shards_meta(path)
        return Input("sharded model folder", path, _config_of(meta, path / SHARDS_JSON),
                     {k: v for k, v in meta.items() if k not in ("format", "version", "layout", "config", "sha256")},
                     _tokenizer(path / "tokenizer"), meta.get("layout"))
    if (path / MODEL_META).is_file():
        meta = read_meta(path)
        return Input("model folder", path, _config_of(meta, path / MODEL_META),
                     {k: v for k, v in meta.items() if k not in ("format", "version", "config", "sha256")},
                     _tokenizer(path / "tokenizer"))
    if (path / TRAIN_META).is_file():
        meta = _json(path / TRAIN_META)
        check_seal(meta, path / TRAIN_META)
        carried = {k: meta[k] for k in CARRIED if k in meta}
        tok = meta.get("tokenizer_dir")
        kind = "training checkpoint" if (path / "weights").is_dir() else "DeepSpeed checkpoint"
        return Input(kind, path, _config_of(meta, path / TRAIN_META), carried,
                     _tokenizer(Path(tok) if tok else None), meta.get("layout"), meta)
    raise CheckpointError(f"{path}: not a model folder ({MODEL_META}), sharded model folder ({SHARDS_JSON}) "
                          f"or training checkpoint ({TRAIN_META})")


def _consolidate_deepspeed(path: Path, config: dict, layout: dict | None) -> dict[str, torch.Tensor]:
    """Full weights of a DeepSpeed checkpoint saved at tp = pp = 1 (any ZeRO stage)."""
    from megaxatl.config import config_from_dict

    if layout and (layout.get("tp", 1) != 1 or layout.get("pp", 1) != 1):
        raise CheckpointError(f"{path}: a DeepSpeed checkpoint saved at tp={layout.get('tp', 1)} x "
                              f"pp={layout.get('pp', 1)} without weights/; only tp = pp = 1 ones can be consolidated")
    from megaxatl.torchfile import UnsafeFile
    from megaxatl.train.deepspeed_files import weights_only_loads

    zero = config_from_dict(config, str(path / TRAIN_META)).parallel.zero_stage
    if zero == 0:
        f = path / "mp_rank_00_model_states.pt"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (a ZeRO-0 DeepSpeed checkpoint keeps its weights there)")
        try:
            with weights_only_loads():
                state = torch.load(f, map_location="cpu")["module"]
        except UnsafeFile:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{f}: unreadable DeepSpeed model states ({type(e).__name__}: {first})") from None
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    weights_only_loads():  # its chatter; it loads with weights_only=False
                state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        except UnsafeFile:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{path}: cannot consolidate this ZeRO-{zero} checkpoint "
                                  f"({type(e).__name__}: {first})") from None
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _check_fits(inp: Input, source: TensorSource, layout: Layout) -> None:
    got = source.entries()
    missing = [k for k in layout.shapes if k not in got]
    unexpected = [k for k in got if k not in layout.shapes]
    if missing or unexpected:
        raise CheckpointError(f"{inp.path}: weights do not fit the config (missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''})")
    for k, shape in layout.shapes.items():
        if tuple(got[k][0]) != tuple(shape):
            raise CheckpointError(f"{inp.path}: '{k}' is {tuple(got[k][0])}, the config makes it {tuple(shape)}")


def open_model(path: str | Path):
    """Any weights folder detect_input knows (a `checkpoints/` folder stands for its latest) ->
    (model, cfg, meta, tokenizer folder or None): the plain model built from the folder's config,
    its weights read one tensor at a time and checked to fit. What `eval` and `generate` load."""
    from megaxatl.config import config_from_dict
    from megaxatl.models import build

    src = detect_input(path)
    cfg = config_from_dict(src.config, str(src.path))
    layout = check_layout(cfg.model, 1, 1)
    source = src.open()
    _check_fits(src, source, layout)
    model = build(cfg)
    state = model.state_dict()  # views of the parameters: copying into them loads the model
    with torch.no_grad():
        for key in layout.shapes:
            state[key].copy_(source.read(key))
    return model, cfg, {**src.meta, "kind": src.kind, "path": str(src.path)}, src.tokenizer_dir


# ---- the model folder, written one tensor at a time ---------------------------------------------

def _write_safetensors(file: Path, source: TensorSource) -> int:
    """safetensors' format (8-byte header length, JSON header, raw little-endian data), written
    one tensor at a time so that memory never holds the whole model. -> bytes of tensor data."""
    entries = source.entries()
    header: dict = {"__metadata__": {"format": "pt"}}
    end = 0
    for k, (shape, dtype) in entries.items():
        if dtype not in _ST_NAMES:
            raise CheckpointError(f"'{k}': dtype {dtype} has no safetensors name")
        n = int(torch.Size(shape).numel()) * dtype.itemsize
        header[k] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [end, end + n]}
        end += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, (shape, dtype) in entries.items():
            t = source.read(k)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(f"'{k}': read {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
    return end


def save_model_dir_streaming(out: str | Path, source: TensorSource, config: dict, meta: dict | None = None,
                             tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                             extra_files: dict[str, str] | None = None, replaceable=is_model_dir,
                             kind: str = MODEL_FOLDER) -> tuple[int, int]:
    """A model folder (as checkpoint.save_model_dir writes it) from a source, one tensor in memory
    at a time, plus `extra_files` {name: text}. -> (tensors, bytes). An existing `out` is replaced
    only with `overwrite`, and only when `replaceable` (fsutil.check_output)."""
    import shutil

    with atomic_dir(out, overwrite, replaceable=replaceable, kind=kind) as tmp:
        nbytes = _write_safetensors(tmp / WEIGHTS, source)
        full = {"format": MODEL_FORMAT, "version": 1, **(meta or {}), "config": config,
                "sha256": {WEIGHTS: sha256_file(tmp / WEIGHTS)}}
        (tmp / MODEL_META).write_text(json.dumps(full, indent=2) + "\n")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return len(source.entries()), nbytes


# ---- the command --------------------------------------------------------------------------------

WEIGHTS_OUTPUT = f"{MODEL_FOLDER} or {SHARDED_FOLDER}"


def is_weights_output(path: Path) -> bool:
    """A model folder of either format: what reshard / transfer --overwrite may replace."""
    return is_model_dir(path) or is_sharded_dir(path)


def reshard(inp: str | Path, out: str | Path, tp: int = 1, pp: int = 1, to: str = "sharded",
            overwrite: bool = False) -> dict:
    """Python API of `megaxatl reshard`. -> a summary dict (tensors, bytes, layout, output, input kind)."""
    from megaxatl.config import config_from_dict

    if to not in ("sharded", "model-dir"):
        raise ValueError(f"--to must be 'sharded' or 'model-dir', got {to!r}")
    out = Path(out)
    src = detect_input(inp)
    # what --overwrite may replace: an earlier reshard output (either kind), never an input
    check_output(out, inputs=[inp, src.path, src.tokenizer_dir], overwrite=overwrite, replaceable=is_weights_output,
                 kind=WEIGHTS_OUTPUT)
    cfg = config_from_dict(src.config, str(src.path))
    layout = check_layout(cfg.model, tp, pp) if to == "sharded" else check_layout(cfg.model, 1, 1)
    source = src.open()
    _check_fits(src, source, layout)
    source = _InOrder(source, list(layout.shapes))
    meta = {**src.meta, "resharded_from": {"path": str(src.path), "kind": src.kind}}
    if to == "sharded":
        tensors, nbytes = save_sharded_dir(out, source, layout, src.config, meta, src.tokenizer_dir, overwrite,
                                           replaceable=is_weights_output, kind=WEIGHTS_OUTPUT)
        where = f"tp={tp} x pp={pp}"
    else:
        tensors, nbytes = save_model_dir_streaming(out, source, src.config, meta, src.tokenizer_dir, overwrite,
                                                   replaceable=is_weights_output, kind=WEIGHTS_OUTPUT)
        where = "full weights"
    return {"tensors": tensors, "bytes": nbytes, "layout": where, "output": str(out), "input": src.kind}


def add_reshard_args(p) -> None:
    p.add_argument("--in", dest="input", required=True,
                   help="model folder, sharded model folder, or training checkpoint folder (step_XXXXXXXX)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the output (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the output (default 1)")
    p.add_argument("--to", choices=("sharded", "model-dir"), default="sharded",
                   help="sharded: DCP shards at tp x pp (default); model-dir: one full model.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run_reshard(args) -> int:
    s = reshard(args.input, args.out, args.tp, args.pp, args.to, args.overwrite)
    print(f"megaxatl reshard: {s['tensors']} tensors, {_size(s['bytes'])} ({s['input']}) -> {s['output']} "
          f"({s['layout']})")
    return 0
