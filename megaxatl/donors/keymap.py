"""Key-map tables (litgpt style), read in both directions: a checkpoint's keys -> canonical names
(donor import, import-hf) and canonical names -> the checkpoint's keys (export-hf).

A family module declares its tables as `{original key template: rule}`, `{}` standing for the layer
index. A rule is:

- a canonical name template (`"layers.{}.norm1.weight"`): copied as is, both ways;
- an `Op`: one canonical tensor computed from the original by a view (`fn`, e.g. a Conv1D
  transpose) with its inverse (`inv`) for the way back;
- a `Fused`: one original tensor holding several canonical ones (GPT-NeoX's per-head
  query_key_value, Phi-3's qkv_proj / gate_up_proj), with `split` and its inverse `join`;
- `None`: a deliberate drop (rotary caches, attention-mask buffers), recorded with `DROP_REASON`.

Reading is exact: the templates are expanded for `n_layers` layers under the detected base-model
prefix, every key in the checkpoint must match one expansion (else an error naming the key and
file), every expected canonical tensor must be produced exactly once (else an error naming what is
missing), and every shape is checked before any data is read. Writing is exact too: every
canonical tensor must have a rule (the first one naming it, under the first prefix), and a fused
tensor is written only with all of its parts. The ops only view, slice, concatenate and transpose:
nothing is cast, so a round trip gives the same bits.

`dims` (for the ops) is anything with `n_heads`, `n_kv_heads`, `head_dim`, `d_model`, `d_mlp`: a
DonorSpec or `Dims.of(model_config)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Union

import torch

from .spec import DonorError

DROP_REASON = "non-parameter buffer (rotary cache / attention mask): deliberate drop"
TIED_REASON = "duplicate of embed.weight (tie_word_embeddings): deliberate drop"


class KeyMapError(ValueError):
    """A tensor that no rule of the table writes (export direction)."""


class Dims(NamedTuple):
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_mlp: int

    @classmethod
    def of(cls, cfg) -> "Dims":
        """From a ModelConfig."""
        return cls(cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim, cfg.d_model, cfg.d_mlp)


@dataclass(frozen=True)
class Op:
    """One canonical tensor from one original tensor: `fn(tensor, dims)`, back with `inv`.

    `fn` must only view / slice / transpose, so that applying it to a meta tensor gives the shape
    without reading data."""

    target: str
    fn: Callable[[torch.Tensor, object], torch.Tensor]
    how: str
    inv: Callable[[torch.Tensor, object], torch.Tensor] | None = None


@dataclass(frozen=True)
class Fused:
    """Several canonical tensors (`targets`, in `split`'s order) stored as one original tensor."""

    targets: tuple[str, ...]
    split: Callable[[torch.Tensor, object], list[torch.Tensor]]
    join: Callable[[list[torch.Tensor], object], torch.Tensor]
    how: str  # '{}' stands for the part's short name (its target's last module name)

    def parts(self) -> tuple[Op, ...]:
        def part(i: int):
            return lambda t, dims: self.split(t, dims)[i]

        return tuple(Op(t, part(i), self.how.format(t.split(".")[-2])) for i, t in enumerate(self.targets))


def _identity(t: torch.Tensor, dims) -> torch.Tensor:
    return t


def transposed(target: str, how: str = "transposed") -> Op:
    return Op(target, lambda t, dims: t.t(), how, lambda t, dims: t.t())


def rows_split(targets: tuple[str, ...], sizes: Callable[[object], tuple[int, ...]], how: str) -> Fused:
    """A tensor whose rows (dim 0) are the parts one after another (Phi-3's qkv_proj, gate_up_proj)."""
    return Fused(targets, lambda t, dims: list(t.split(sizes(dims), dim=0)),
                 lambda parts, dims: torch.cat(parts, dim=0), how)


Rule = Union[str, Op, Fused, None]


def separate_proj_keys(mlp_bias: bool = False) -> dict[str, str]:
    """The Llama-style layer tensors every such family names the same way: q/k/v/o projections
    (weight and an optional bias) under self_attn, gate/up/down under mlp."""
    out = {}
    for p in "qkvo":
        for kind in ("weight", "bias"):
            out[f"layers.{{}}.self_attn.{p}_proj.{kind}"] = f"layers.{{}}.mixer.{p}_proj.{kind}"
    for p in ("gate", "up", "down"):
        for kind in ("weight", "bias") if mlp_bias else ("weight",):
            out[f"layers.{{}}.mlp.{p}_proj.{kind}"] = f"layers.{{}}.mlp.{p}_proj.{kind}"
    return out


@dataclass(frozen=True)
class KeyMap:
    """A family's tables. `prefixes`: the base-model prefixes tried in order (e.g. `"model."` for a
    `*ForCausalLM` save, `""` for a bare base-model save); the one under which `anchor` (the
    embedding key) exists is used for every key of `base`, and the first one is written. `head`
    keys are never prefixed."""

    prefixes: tuple[str, ...]
    anchor: str
    base: Mapping[str, Rule]
    head: Mapping[str, Rule]


@dataclass(frozen=True)
class Entry:
    """How one canonical tensor is made: original `source` key (in `file`), `op` applied to it,
    giving a tensor of `shape`."""

    source: str
    file: Path
    op: Op
    shape: tuple[int, ...]


def _ops(rule: Rule) -> tuple[Op, ...]:
    if isinstance(rule, str):
        return (Op(rule, _identity, "copy", _identity),)
    if isinstance(rule, Fused):
        return rule.parts()
    return (rule,)


def _detect_prefix(keymap: KeyMap, keys: set[str], where: str) -> str:
    for prefix in keymap.prefixes:
        if prefix + keymap.anchor in keys:
            return prefix
    tried = ", ".join(repr(p + keymap.anchor) for p in keymap.prefixes)
    raise DonorError(f"{where}: no embedding tensor found (looked for {tried})")


def _expand(keymap: KeyMap, prefix: str, n_layers: int) -> dict[str, tuple[Rule, int | None]]:
    out: dict[str, tuple[Rule, int | None]] = {}
    for table, pre in ((keymap.base, prefix), (keymap.head, "")):
        for template, rule in table.items():
            if "{}" in template:
                for i in range(n_layers):
                    out[pre + template.format(i)] = (rule, i)
            else:
                out[pre + template] = (rule, None)
    return out


def _fill(template: str, layer: int | None) -> str:
    return template.format(layer) if layer is not None else template


def resolve(keymap: KeyMap, dims, store, where: str, *, n_layers: int, expected: dict[str, tuple[int, ...]],
            tie_embeddings: bool, family: str, facts: str = "") -> tuple[dict[str, Entry], dict[str, str]]:
    """Map every original key of `store` (keys / file_of / dtype / shape) through `keymap` onto
    the canonical names of `expected` (name -> shape).

    Returns (entries: canonical name -> Entry, in `expected` order; dropped: original key ->
    reason). Raises DonorError on any unknown, missing or misshapen key. `facts`: what decides the
    expected set, for the message of a tensor that maps outside it."""
    keys = store.keys()
    prefix = _detect_prefix(keymap, set(keys), where)
    table = _expand(keymap, prefix, n_layers)
    found: dict[str, Entry] = {}
    dropped: dict[str, str] = {}
    for key in keys:
        file = store.file_of(key)
        if key not in table:
            hint = f" (config has {n_layers} layers)" if any(c.isdigit() for c in key) else ""
            raise DonorError(
                f"{file}: unknown tensor key {key!r} for a {family} donor{hint}; expected base-model prefix {prefix!r}"
            )
        rule, layer = table[key]
        if rule is None:
            dropped[key] = DROP_REASON
            continue
        dtype = store.dtype(key)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise DonorError(f"{file}: tensor {key!r} has dtype {dtype}, expected a floating-point weight")
        src_shape = store.shape(key)
        for op in _ops(rule):
            target = _fill(op.target, layer)
            if target == "lm_head.weight" and tie_embeddings:
                dropped[key] = TIED_REASON
                continue
            if target not in expected:
                raise DonorError(f"{file}: tensor {key!r} maps to {target!r}, which a donor with this config does "
                                 f"not have ({facts})")
            if target in found:
                raise DonorError(f"{file}: {target!r} is given by both {found[target].source!r} and {key!r}")
            try:
                shape = tuple(op.fn(torch.empty(src_shape, dtype=dtype, device="meta"), dims).shape)
            except RuntimeError as e:  # a view that does not fit: the tensor disagrees with the config
                raise DonorError(f"{file}: tensor {key!r} of shape {src_shape} does not fit the config ({e})") from e
            if shape != expected[target]:
                raise DonorError(
                    f"{file}: tensor {key!r} of shape {src_shape} gives {target!r} of shape {shape}, "
                    f"but the config implies {expected[target]}"
                )
            found[target] = Entry(key, file, op, shape)
    missing = [name for name in expected if name not in found]
    if missing:
        show = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
        raise DonorError(f"{where}: the checkpoint lacks tensors the config implies: {show}")
    return {name: found[name] for name in expected}, dropped


def to_original(keymap: KeyMap, state: dict[str, torch.Tensor], dims, n_layers: int,
                where: str) -> dict[str, torch.Tensor]:
    """Canonical tensors -> the checkpoint's keys (the inverse of `resolve`), under the first prefix."""
    table = _expand(keymap, keymap.prefixes[0], n_layers)
    writers: dict[str, tuple[str, Rule, int]] = {}  # canonical name -> (original key, rule, part)
    for key, (rule, layer) in table.items():
        if rule is None:
            continue
        for part, op in enumerate(_ops(rule)):
            writers.setdefault(_fill(op.target, layer), (key, rule, part))
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        if name not in writers:
            raise KeyMapError(f"{where}: tensor {name!r} has no rule in the key table")
        key, rule, part = writers[name]
        if isinstance(rule, Fused):
            fused.setdefault(key, {})[part] = t
            continue
        op = _ops(rule)[0]
        if op.inv is None:
            raise KeyMapError(f"{where}: the rule for {name!r} ({op.how}) has no inverse")
        out[key] = op.inv(t, dims).contiguous()
    for key, parts in fused.items():
        rule, layer = table[key]
        if len(parts) != len(rule.targets):
            missing = [_fill(t, layer) for i, t in enumerate(rule.targets) if i not in parts]
            raise KeyMapError(f"{where}: {key!r} is fused from {len(rule.targets)} tensors; lacking {missing[0]!r}")
        out[key] = rule.join([parts[i] for i in range(len(parts))], dims).contiguous()
    return out
