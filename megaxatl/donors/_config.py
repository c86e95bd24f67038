"""Reading the facts of a donor out of an HF config.json, transformers 4.x and 5.x spellings alike.

Config keys are read explicitly; a feature the canonical model cannot reproduce is a `DonorError`
naming the config key, never silently ignored.
"""

from __future__ import annotations

from typing import Any

from .spec import DonorError

_MISSING = object()


class Cfg:
    """A config dict plus where it came from, for error messages."""

    def __init__(self, cfg: dict, where: str):
        self.cfg, self.where = cfg, where

    def get(self, *names: str, default: Any = _MISSING) -> Any:
        """The first of `names` present and not null; `default` if none; DonorError if no default."""
        for n in names:
            if self.cfg.get(n) is not None:
                return self.cfg[n]
        if default is _MISSING:
            raise DonorError(f"{self.where}: missing config key {names[0]!r}")
        return default

    def int(self, *names: str, default: Any = _MISSING) -> int:
        v = self.get(*names, default=default)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise DonorError(f"{self.where}: config key {names[0]!r} = {v!r} is not a positive integer")
        return v

    def flag(self, name: str, default: bool) -> bool:
        v = self.get(name, default=default)
        if not isinstance(v, bool):
            raise DonorError(f"{self.where}: config key {name!r} = {v!r} is not a boolean")
        return v

    def unsupported(self, key: str, value: Any, why: str) -> DonorError:
        return DonorError(f"{self.where}: config key {key!r} = {value!r} is not supported: {why}")

    def token_id(self, name: str):
        v = self.cfg.get(name)
        if isinstance(v, list):
            return tuple(v) if len(v) != 1 else v[0]
        return v

    def rope(self, *, default_pct: float, pct_keys: tuple[str, ...] = (),
             theta_keys: tuple[str, ...] = ("rope_theta",), default_theta: float = 10000.0) -> tuple[float, float]:
        """(rotary_pct, rope_theta). Plain RoPE only: any scaling (linear, dynamic, yarn, llama3,
        ...) is a DonorError naming the key. transformers 5 writes `rope_parameters`; 4.x writes
        `rope_theta` / `rope_scaling` (and GPT-NeoX `rotary_pct` / `rotary_emb_base`)."""
        params = self.cfg.get("rope_parameters")
        if params is not None:
            if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
                raise self.unsupported("rope_parameters", params, "one plain RoPE for all layers")
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise self.unsupported("rope_parameters.rope_type", rope_type, "only plain (default) RoPE")
            theta = params.get("rope_theta", self.get(*theta_keys, default=default_theta))
            pct = params.get("partial_rotary_factor", self.get(*pct_keys, default=default_pct) if pct_keys
                             else default_pct)
        else:
            scaling = self.cfg.get("rope_scaling")
            if scaling is not None:
                kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
                if kind != "default":
                    raise self.unsupported("rope_scaling", scaling, "only plain (default) RoPE")
            theta = self.get(*theta_keys, default=default_theta)
            pct = self.get(*pct_keys, default=default_pct) if pct_keys else default_pct
        return float(pct), float(theta)

    def full_attention_only(self) -> None:
        """Every layer must be plain causal full attention (no sliding / chunked layers)."""
        layer_types = self.cfg.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise self.unsupported("layer_types", sorted(set(layer_types)), "only full_attention layers")


# HF activation names -> canonical MLP nonlinearity of a plain (non-gated) MLP
PLAIN_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
