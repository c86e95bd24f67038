"""`open_donor`: one canonical, family-free view of a donor checkpoint, read tensor by tensor."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from . import gemma, gpt2, gpt_neox, llama, olmo2, phi3, stablelm
from ._config import interpret_config
from .checkpoint import TensorStore, locate
from .keymap import Entry, resolve
from .spec import DonorError, DonorSpec, canonical_shapes

FAMILY_MODULES: dict[str, ModuleType] = {t: m for m in (gpt_neox, llama, gpt2, gemma, phi3, olmo2, stablelm)
                                         for t in m.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILY_MODULES))
ROPE_FREQS_REASON = ("llama.cpp's RoPE frequency factors (its form of llama3 scaling): read into the spec's "
                     "rope_scaling ('factors')")


def family_module(model_type: str | None, where: str) -> ModuleType:
    module = FAMILY_MODULES.get(model_type)
    if module is None:
        raise DonorError(f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return module


def spec_of_config(raw: dict, where: str, dtype: str = "unknown") -> DonorSpec:
    """The DonorSpec of an HF config dict, as transformers interprets it."""
    module = family_module(raw.get("model_type"), where)
    return module.spec_from_config(interpret_config(raw, where), where, dtype=dtype)


def resolve_spec(module: ModuleType, spec: DonorSpec, store, where: str):
    """(entries, dropped) of `store` read as a donor of `spec` (keymap.resolve)."""
    facts = (f"qkv_bias={spec.qkv_bias}, attn_out_bias={spec.attn_out_bias}, mlp_bias={spec.mlp_bias}, "
             f"norm={spec.norm}, norm_placement={spec.norm_placement}, qk_norm={spec.qk_norm}, "
             f"tie_embeddings={spec.tie_embeddings}")
    return resolve(module.KEYMAPS[spec.family], spec, store, where, n_layers=spec.n_layers,
                   expected=canonical_shapes(spec), tie_embeddings=spec.tie_embeddings, family=spec.family,
                   facts=facts)


class Donor:
    """A donor's canonical tensors (see `megaxatl.donors.spec` for names and shapes).

    Nothing is read until `get`: `keys`, `shape`, `source` and `spec` come from the file headers
    and the config. Every original tensor is accounted for: it is the source of one or more
    canonical tensors, or in `dropped` with the reason.
    """

    def __init__(self, path: Path, spec: DonorSpec, store: TensorStore, entries: dict[str, Entry],
                 dropped: dict[str, str], config: dict, tokenizer_dir: Path | None):
        self.path = path
        self.spec = spec
        self.config = config  # the raw config dict (config.json, or derived from GGUF metadata)
        self.tokenizer_dir = tokenizer_dir
        self.dropped = dropped  # original key -> why it is not used
        self.format = store.format  # 'safetensors' | 'bin' | 'gguf'
        self._store = store
        self._entries = entries

    # -- the API -------------------------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        return list(self._store.files)

    def keys(self) -> list[str]:
        """Canonical names in a stable order: embed, pos_embed, layer by layer, norm_f, lm_head."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def get(self, name: str) -> torch.Tensor:
        """Read one canonical tensor (native dtype; only its source tensor is read)."""
        e = self._entry(name)
        src = self._store.get(e.source)
        out = e.op.fn(src, self.spec)
        if out is not src:  # a slice / transpose: own its memory, do not pin the whole fused tensor
            out = out.clone(memory_format=torch.contiguous_format)
        if tuple(out.shape) != e.shape:  # cannot happen after the header checks, unless the file changed
            raise DonorError(f"{e.file}: tensor {e.source!r} changed shape since the donor was opened")
        return out

    def source(self, name: str) -> str:
        """The original key in the donor file this canonical tensor comes from."""
        return self._store.origin(self._entry(name).source)

    def source_file(self, name: str) -> Path:
        return self._entry(name).file

    def how(self, name: str) -> str:
        """What is done to the original tensor ('copy', 'q of per-head fused query_key_value ...')."""
        return self._entry(name).op.how

    # -- conveniences --------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time, in `keys()` order."""
        for name in self._entries:
            yield name, self.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every canonical tensor at once (holds the whole donor in memory)."""
        return dict(self.items())

    def report(self) -> list[tuple[str, str, str]]:
        """(canonical name, original key, how) for every canonical tensor, then
        ('', original key, reason) for every dropped original tensor."""
        rows = [(n, self.source(n), self.how(n)) for n in self._entries]
        rows += [("", self._store.origin(k), why) for k, why in self.dropped.items()]
        return rows

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "Donor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.spec
        return (f"Donor({self.path}, {s.family}, {s.n_layers}x{s.d_model}, {len(self)} tensors, "
                f"{self.format}, {s.dtype})")

    def _entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a canonical tensor of this donor ({self.spec.family})") from None


def open_donor(path: Path | str) -> Donor:
    """Open a donor: a local HF model folder (safetensors, sharded safetensors, .bin, sharded .bin),
    a `.gguf` file, or a folder holding one `.gguf`. Reads the config and the file headers only
    (GGUF: dequantizes every tensor at open, see `checkpoint.GGUFStore`). Never runs donor code."""
    path = Path(path).expanduser()
    loc = locate(path)
    module = family_module(loc.config.get("model_type"), loc.config_where)
    spec = spec_of_config(loc.config, loc.config_where)
    store = loc.open_store()
    try:
        extra_dropped = {}
        rope_freqs = getattr(store, "rope_freqs", None)
        if rope_freqs is not None:  # a GGUF Llama-3.x: the scaling is this tensor, not the metadata
            if spec.rope_scaling is not None:
                raise DonorError(f"{loc.config_where}: both RoPE scaling {spec.rope_scaling} and a rope_freqs tensor")
            factors = rope_freqs.float().flatten().tolist()
            if len(factors) != spec.rotary_dim // 2:
                raise DonorError(f"{path}: rope_freqs has {len(factors)} factors, the heads {spec.rotary_dim // 2} "
                                 "rotary pairs")
            spec = dataclasses.replace(spec, rope_scaling={"type": "factors", "factors": factors})
            extra_dropped[store.rope_freqs_name] = ROPE_FREQS_REASON
        entries, dropped = resolve_spec(module, spec, store, str(path))
        dropped |= extra_dropped
        dtype = store.dtype(entries["embed.weight"].source)
        spec = dataclasses.replace(spec, dtype=str(dtype).removeprefix("torch."))
    except BaseException:
        store.close()
        raise
    return Donor(path, spec, store, entries, dropped, loc.config, loc.tokenizer_dir)
