"""Finding a donor's files and reading its tensors one at a time, whatever the file format.

A `TensorStore` gives the original keys, each key's shape and dtype without reading data, and one
tensor on request:

- `SafetensorsStore`: `model.safetensors` or a sharded `model.safetensors.index.json`. Headers are
  parsed (and checked against the file size) at open; `get` reads one tensor through safetensors'
  memory map.
- `TorchBinStore`: `pytorch_model.bin` or a sharded `pytorch_model.bin.index.json`, read with
  `torch.load(weights_only=True, mmap=True)` (no code runs; tensors stay on disk until touched).
- `GGUFStore`: a `.gguf` file, read with transformers' GGUF loader, which dequantizes and un-permutes
  Q/K into HF layout. GGUF cannot be streamed tensor by tensor through that loader: every tensor is
  dequantized (to float32 for quantized types) at open, so it needs ~4 bytes per parameter of RAM.

Donor files are untrusted input: every failure to parse is a `DonorError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megaxatl import torchfile

from .spec import DonorError

CONFIG_NAME = "config.json"
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


class TensorStore:
    """Original keys -> tensors of one donor checkpoint (one or more files)."""

    format: str
    files: list[Path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype | str:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def origin(self, key: str) -> str:
        """The key as the file itself names it (differs from `key` only for GGUF)."""
        return key

    def close(self) -> None:
        pass


def _read_index(index_path: Path) -> dict[str, Path]:
    """weight_map of a sharded-checkpoint index: key -> shard path (each shard must exist)."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DonorError(f"{index_path}: not a valid checkpoint index ({type(e).__name__}: {e})") from e
    out: dict[str, Path] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise DonorError(f"{index_path}: shard name {shard!r} of key {key!r} is not a plain file name")
        path = index_path.parent / shard
        if not path.is_file():
            raise DonorError(f"{index_path}: shard {shard!r} (holding {key!r}) is missing")
        out[key] = path
    return out


def _check_index_matches(index_path: Path, index: dict[str, Path], found: dict[str, Path]) -> None:
    for key, path in found.items():
        if key not in index:
            raise DonorError(f"{path}: tensor key {key!r} is not listed in {index_path.name}")
        if index[key] != path:
            raise DonorError(f"{path}: tensor key {key!r} is listed in {index_path.name} under {index[key].name}")
    for key, path in index.items():
        if key not in found:
            raise DonorError(f"{index_path}: key {key!r} listed for shard {path.name} is not in that file")


class SafetensorsStore(TensorStore):
    format = "safetensors"

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = _read_index(path) if path.name.endswith(".index.json") else None
        self.files = sorted(set(index.values())) if index is not None else [path]
        self._handles, self._file_of, self._slices = {}, {}, {}
        for f in self.files:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
                keys = list(handle.keys())
            except Exception as e:  # SafetensorError / OSError: truncated, bad header, not safetensors
                raise DonorError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from e
            self._handles[f] = handle
            for k in keys:
                if k in self._file_of:
                    raise DonorError(f"{f}: tensor key {k!r} also appears in {self._file_of[k]}")
                self._file_of[k] = f
                self._slices[k] = handle.get_slice(k)
        if index is not None:
            _check_index_matches(path, index, self._file_of)

    def shape(self, key):
        return tuple(self._slices[key].get_shape())

    def dtype(self, key):
        name = self._slices[key].get_dtype()
        return _SAFETENSORS_DTYPES.get(name, name)

    def get(self, key):
        f = self._file_of[key]
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:
            raise DonorError(f"{f}: cannot read tensor {key!r} ({type(e).__name__}: {e})") from e

    def close(self):
        self._handles.clear()
        self._slices.clear()


class TorchBinStore(TensorStore):
    """`pytorch_model.bin` shards, loaded with weights_only (no pickled code runs) and mmap."""

    format = "bin"

    def __init__(self, path: Path):
        index = _read_index(path) if path.name.endswith(".index.json") else None
        self.files = sorted(set(index.values())) if index is not None else [path]
        self._tensors: dict[str, torch.Tensor] = {}
        self._file_of = {}
        for f in self.files:
            state = self._load(f)
            for k, t in state.items():
                if not isinstance(k, str) or not isinstance(t, torch.Tensor):
                    raise DonorError(f"{f}: entry {k!r} is a {type(t).__name__}, not a tensor")
                if k in self._file_of:
                    raise DonorError(f"{f}: tensor key {k!r} also appears in {self._file_of[k]}")
                self._file_of[k] = f
                self._tensors[k] = t
        if index is not None:
            _check_index_matches(path, index, self._file_of)

    @staticmethod
    def _load(f: Path) -> dict:
        try:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) format cannot be memory-mapped
                    raise
                state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError (weights_only refused), truncated zip, ...
            refused = torchfile.refusal(f, e)  # one line, without torch's advice to drop weights_only
            if refused is not None:
                raise DonorError(refused) from None
            first = (str(e).strip().splitlines() or [""])[0]
            raise DonorError(f"{f}: not a readable weights-only torch checkpoint ({type(e).__name__}: {first})") from e
        if not isinstance(state, dict):
            raise DonorError(f"{f}: holds a {type(state).__name__}, not a state dict")
        return state

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def dtype(self, key):
        return self._tensors[key].dtype

    def get(self, key):
        # a private copy: reads this tensor's pages only, and a caller's in-place edit cannot leak
        # into the next get()
        return self._tensors[key].clone()

    def close(self):
        self._tensors.clear()


class GGUFStore(TensorStore):
    """All tensors of a GGUF file, dequantized at open by transformers' GGUF loader (HF names).

    transformers' loader skips any GGUF tensor its name map lacks, so every tensor the file lists
    (gguf's own reader) is checked here: one that became no HF tensor is an error naming it, but
    for `rope_freqs.weight`, llama.cpp's RoPE frequency factors (a Llama-3.x's llama3 scaling),
    kept as `rope_freqs` for the spec."""

    format = "gguf"
    rope_freqs_name = "rope_freqs.weight"

    def __init__(self, path: Path, config):
        try:
            from gguf import GGUFReader, dequantize
            from transformers import AutoModelForCausalLM
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        except ImportError as e:  # pragma: no cover - depends on the install
            raise DonorError(f"{path}: reading GGUF needs transformers and gguf ({e})") from e
        self.files = [path]
        # transformers maps GGUF names onto a model's parameter names; a model on the meta device
        # gives those names without allocating any weights.
        try:
            with torch.device("meta"):
                names_model = AutoModelForCausalLM.from_config(config)
            parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=names_model)
            listed = {t.name: t for t in GGUFReader(str(path)).tensors}
        except Exception as e:
            raise DonorError(f"{path}: cannot read GGUF tensors ({type(e).__name__}: {e})") from e
        self._tensors: dict[str, torch.Tensor] = parsed["tensors"]
        self._file_of = {k: path for k in self._tensors}
        mapped = self._gguf_map(names_model, parsed.get("config", {}))
        self._origin = {hf: g for g, hf in mapped.items()}
        self.rope_freqs = None
        for name, tensor in listed.items():
            if name in mapped and mapped[name] in self._tensors:
                continue
            if name == self.rope_freqs_name:
                self.rope_freqs = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
                continue
            raise DonorError(f"{path}: GGUF tensor {name!r} has no counterpart in transformers' "
                             f"{config.model_type} model (its loader would drop it)")

    @staticmethod
    def _gguf_map(names_model, config: dict) -> dict[str, str]:
        """GGUF tensor name -> HF name, as transformers' loader maps them (its internal API)."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        arch = config.get("model_type", "")
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
        return get_gguf_hf_weights_map(names_model, processor)

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def dtype(self, key):
        return self._tensors[key].dtype

    def get(self, key):
        return self._tensors[key].clone()  # the store keeps its copy intact for the next get()

    def origin(self, key):
        g = self._origin.get(key)
        return f"{g} (GGUF; as {key})" if g else key

    def close(self):
        self._tensors.clear()


# ---------------------------------------------------------------------------------------------
# locating a donor


class Located:
    """Where a donor's pieces are: config (a dict), weights (a store factory), tokenizer folder."""

    def __init__(self, kind: str, weights: Path, config: dict, config_where: str, tokenizer_dir: Path | None,
                 hf_config=None):
        self.kind, self.weights, self.config, self.config_where = kind, weights, config, config_where
        self.tokenizer_dir, self.hf_config = tokenizer_dir, hf_config

    def open_store(self) -> TensorStore:
        if self.kind == "safetensors":
            return SafetensorsStore(self.weights)
        if self.kind == "bin":
            return TorchBinStore(self.weights)
        return GGUFStore(self.weights, self.hf_config)


def _tokenizer_dir(folder: Path) -> Path | None:
    return folder if any((folder / n).is_file() for n in TOKENIZER_FILES) else None


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DonorError(f"{path}: not a readable JSON config ({type(e).__name__}: {e})") from e
    if not isinstance(cfg, dict):
        raise DonorError(f"{path}: config is a JSON {type(cfg).__name__}, not an object")
    return cfg


def _gguf_config(gguf: Path):
    """The HF config transformers derives from a GGUF file's metadata (no weights read)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except Exception as e:
        raise DonorError(f"{gguf}: cannot read GGUF metadata ({type(e).__name__}: {e})") from e
    return config


def locate(path: Path | str) -> Located:
    """Find the config and weights of a donor at `path`: an HF folder (safetensors, sharded
    safetensors, .bin, sharded .bin, in that order of preference), a `.gguf` file, or a folder
    holding exactly one `.gguf` (and no HF weights)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DonorError(f"{path}: donor path does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return _located_gguf(path)
        raise DonorError(f"{path}: a donor is an HF model folder or a .gguf file, not {path.name!r}")

    config_path = path / CONFIG_NAME
    for name, kind in ((SAFE_INDEX, "safetensors"), (SAFE_SINGLE, "safetensors"),
                       (BIN_INDEX, "bin"), (BIN_SINGLE, "bin")):
        if (path / name).is_file():
            if not config_path.is_file():
                raise DonorError(f"{config_path}: missing (the donor folder has {name} but no config)")
            cfg = _read_config(config_path)
            return Located(kind, path / name, cfg, str(config_path), _tokenizer_dir(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _located_gguf(ggufs[0])
    if len(ggufs) > 1:
        raise DonorError(f"{path}: holds several .gguf files ({', '.join(g.name for g in ggufs)}); name one")
    if not config_path.is_file():
        raise DonorError(f"{config_path}: missing, and {path} holds no weights either")
    raise DonorError(
        f"{path}: no weights found (looked for {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX}, {BIN_SINGLE}, *.gguf)"
    )


def _check_gguf_metadata(gguf: Path) -> None:
    """transformers' GGUF config does not carry RoPE scaling metadata, nor a sliding window for
    the architectures whose key map lacks one (Llama, Mistral), so a file that uses them would load
    as something it is not: refuse it here, naming the GGUF key. (Header only.)"""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
        from transformers.integrations.gguf import read_gguf_metadata
    except ImportError:  # pragma: no cover - older transformers
        return
    try:
        metadata, _ = read_gguf_metadata(str(gguf))
    except Exception as e:
        raise DonorError(f"{gguf}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    arch = metadata.get("general.architecture")
    for key, value in metadata.items():
        if key.endswith(".rope.scaling.type") and value not in ("none", None):
            raise DonorError(f"{gguf}: GGUF key {key!r} = {value!r} is not supported: transformers reads no RoPE "
                             "scaling from GGUF metadata")
        if (key.endswith(".attention.sliding_window") and value
                and "attention.sliding_window" not in GGUF_CONFIG_MAPPING.get(arch, {})):
            raise DonorError(f"{gguf}: GGUF key {key!r} = {value!r} is not supported: transformers' {arch} GGUF "
                             "config has no sliding window")


def _located_gguf(gguf: Path) -> Located:
    _check_gguf_metadata(gguf)
    config = _gguf_config(gguf)
    cfg = config.to_dict()
    return Located("gguf", gguf, cfg, f"{gguf} (GGUF metadata)", _tokenizer_dir(gguf.parent), hf_config=config)
