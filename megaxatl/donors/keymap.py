"""Key-map tables (litgpt style) and their strict resolution against a checkpoint's keys.

A family module declares its tables as `{original key template: rule}`, `{}` standing for the layer
index. A rule is:

- a canonical name template (`"layers.{}.norm1.weight"`): copied as is;
- an `Op` (one canonical tensor computed from the original, e.g. a Conv1D transpose) or a tuple of
  `Op`s (a fused tensor split into several canonical ones);
- `None`: a deliberate drop (rotary caches, attention-mask buffers), recorded with `DROP_REASON`.

Resolution is exact: the templates are expanded for `n_layers` layers under the detected base-model
prefix, every key in the checkpoint must match one expansion (else `DonorError` naming the key and
file), every canonical tensor the spec implies must be produced exactly once (else `DonorError`
naming what is missing), and every shape is checked against the spec before any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Union

import torch

from .spec import DonorError, DonorSpec, canonical_shapes

DROP_REASON = "non-parameter buffer (rotary cache / attention mask): deliberate drop"
TIED_REASON = "duplicate of embed.weight (tie_word_embeddings): deliberate drop"


@dataclass(frozen=True)
class Op:
    """One canonical tensor made from one original tensor: `fn(tensor, spec) -> tensor`.

    `fn` must only view / slice / transpose, so that applying it to a meta tensor gives the shape
    without reading data.
    """

    target: str
    fn: Callable[[torch.Tensor, DonorSpec], torch.Tensor]
    how: str


def _identity(t: torch.Tensor, spec: DonorSpec) -> torch.Tensor:
    return t


Rule = Union[str, Op, tuple, None]


@dataclass(frozen=True)
class KeyMap:
    """A family's tables. `prefixes`: the base-model prefixes tried in order (e.g. `"model."` for a
    `*ForCausalLM` save, `""` for a bare base-model save); the one under which `anchor` (the
    embedding key) exists is used for every key of `base`. `head` keys are never prefixed."""

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
        return (Op(rule, _identity, "copy"),)
    if isinstance(rule, Op):
        return (rule,)
    return tuple(rule)


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


def resolve(keymap: KeyMap, spec: DonorSpec, store, where: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """Map every original key of `store` through `keymap`.

    Returns (entries: canonical name -> Entry, in `canonical_shapes(spec)` order;
    dropped: original key -> reason). Raises DonorError on any unknown, missing or misshapen key.
    """
    keys = store.keys()
    prefix = _detect_prefix(keymap, set(keys), where)
    table = _expand(keymap, prefix, spec.n_layers)
    expected = canonical_shapes(spec)
    found: dict[str, Entry] = {}
    dropped: dict[str, str] = {}
    for key in keys:
        file = store.file_of(key)
        if key not in table:
            hint = f" (config has {spec.n_layers} layers)" if any(c.isdigit() for c in key) else ""
            raise DonorError(
                f"{file}: unknown tensor key {key!r} for a {spec.family} donor{hint}; "
                f"expected base-model prefix {prefix!r}"
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
            target = op.target.format(layer) if layer is not None else op.target
            if target == "lm_head.weight" and spec.tie_embeddings:
                dropped[key] = TIED_REASON
                continue
            if target not in expected:
                raise DonorError(
                    f"{file}: tensor {key!r} maps to {target!r}, which a donor with this config does not have "
                    f"(qkv_bias={spec.qkv_bias}, attn_out_bias={spec.attn_out_bias}, mlp_bias={spec.mlp_bias}, "
                    f"norm={spec.norm}, tie_embeddings={spec.tie_embeddings})"
                )
            if target in found:
                raise DonorError(f"{file}: {target!r} is given by both {found[target].source!r} and {key!r}")
            try:
                shape = tuple(op.fn(torch.empty(src_shape, dtype=dtype, device="meta"), spec).shape)
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
