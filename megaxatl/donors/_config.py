"""Reading the facts of a donor out of an HF config.json, transformers 4.x and 5.x spellings alike.

The raw config is first interpreted by transformers' own config class for its model_type (no
donor code runs: only the stock classes are used), so defaults (Mistral's sliding_window 4096,
Gemma's layer_types), legacy spellings and their precedence (`rope_scaling` over
`rope_parameters`, GPT-NeoX's `rotary_pct`) are exactly what the transformers model would use.
Keys are then read explicitly; a feature the canonical model cannot reproduce is a `DonorError`
naming the config key, never silently ignored.
"""

from __future__ import annotations

from typing import Any

from . import rope as rope_map
from .spec import DonorError

_MISSING = object()


def interpret_config(cfg: dict, where: str) -> dict:
    """The config as transformers' class for its model_type reads it (`to_dict()` of the parsed
    config: every key the model uses, defaults filled in)."""
    try:
        from transformers import CONFIG_MAPPING
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DonorError(f"{where}: reading a donor config needs transformers ({e})") from e
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise DonorError(f"{where}: model_type {model_type!r} is unknown to transformers")
    try:
        parsed = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in cfg.items() if k != "auto_map"})
    except Exception as e:  # strict-dataclass validation: a wrong type or an impossible combination
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise DonorError(f"{where}: transformers' {model_type} config rejects it: {why}") from None
    return parsed.to_dict()


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

    def dims(self, head_dim_key: bool = True) -> tuple[int, int, int, int]:
        """(d_model, heads, KV heads, head_dim) of an HF attention config; `head_dim_key`: the
        family's modeling reads `head_dim` (else it is always hidden_size / heads)."""
        D, H = self.int("hidden_size"), self.int("num_attention_heads")
        KV = self.int("num_key_value_heads", default=H)
        if H % KV:
            raise self.unsupported("num_key_value_heads", KV, f"num_attention_heads {H} is not a multiple of it")
        hd = self.get("head_dim", default=None) if head_dim_key else None
        if hd is None:
            if D % H:
                raise self.unsupported("num_attention_heads", H, f"hidden_size {D} is not a multiple of it")
            hd = D // H
        return D, H, KV, int(hd)

    def common(self, family: str, dtype: str, tie_default: bool = False) -> dict:
        """The DonorSpec fields every family reads the same way."""
        return dict(family=family, vocab_size=self.int("vocab_size"), n_layers=self.int("num_hidden_layers"),
                    max_seq_len=self.int("max_position_embeddings"), bos_token_id=self.token_id("bos_token_id"),
                    eos_token_id=self.token_id("eos_token_id"), dtype=dtype,
                    tie_embeddings=self.flag("tie_word_embeddings", tie_default))

    def token_id(self, name: str):
        v = self.cfg.get(name)
        if isinstance(v, list):
            return tuple(v) if len(v) != 1 else v[0]
        return v

    def rope(self, *, default_pct: float, pct_keys: tuple[str, ...] = (),
             theta_keys: tuple[str, ...] = ("rope_theta",), default_theta: float = 10000.0,
             params: dict | None = None, key: str = "rope_parameters") -> tuple[float, float, dict | None]:
        """(rotary_pct, rope_theta, scaling) of the standardised `rope_parameters` block (or
        `params`, one layer type's block): see rope.py for the scalings understood."""
        params = self.cfg.get("rope_parameters") if params is None else params
        if params is None:  # configs that carry no rope block (GPT-2) or a bare theta
            theta = float(self.get(*theta_keys, default=default_theta))
            pct = self.get(*pct_keys, default=default_pct) if pct_keys else default_pct
            return float(pct), theta, None
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise self.unsupported(key, params, "one RoPE block for all layers")
        theta, scaling = rope_map.from_hf(params, self.where, key)
        pct = params.get("partial_rotary_factor")
        if pct is None:
            pct = self.get(*pct_keys, default=default_pct) if pct_keys else default_pct
        return float(pct), theta, scaling

    def windows(self, types_apply: bool) -> tuple[int | None, tuple[int, ...]]:
        """(sliding_window, sliding layer indices). `types_apply`: the family's modeling reads
        `layer_types` (Qwen2/3, Gemma-2/3); otherwise a set sliding_window applies to every layer
        (Mistral, Phi-3), as their modeling code does."""
        n = self.int("num_hidden_layers")
        window = self.cfg.get("sliding_window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise self.unsupported("sliding_window", window, "a window is a positive number of positions")
        if not types_apply:
            return window, tuple(range(n)) if window is not None else ()
        layer_types = self.cfg.get("layer_types") or ["full_attention"] * n
        if len(layer_types) != n:
            raise self.unsupported("layer_types", layer_types, f"one type per layer ({n})")
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise self.unsupported("layer_types", unknown, "only full_attention and sliding_attention layers")
        sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
        if sliding and window is None:
            raise self.unsupported("layer_types", "sliding_attention", "sliding layers but no sliding_window")
        return (window, sliding) if sliding else (None, ())


# HF activation names -> canonical MLP nonlinearity of a plain (non-gated) MLP
PLAIN_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


# ---- the way back: our model config -> the HF config fields (export-hf) -------------------------

def hf_common(m, tie_key: str = "tie_word_embeddings") -> dict:
    """HF config fields of a ModelConfig `m` that every Llama-like family spells the same way."""
    return {"vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.attn_head_dim,
            "intermediate_size": m.d_mlp, "max_position_embeddings": m.max_seq_len, tie_key: m.tie_embeddings,
            "initializer_range": m.init_std}


def hf_rope(m, partial: bool = False) -> dict:
    out = rope_map.to_hf(m.rope_theta, m.rope_scaling)
    if partial:
        out["partial_rotary_factor"] = m.rotary_pct
    return out


def hf_layer_types(m) -> dict:
    """layer_types / sliding_window of a pattern's '*' and 'W' layers (other symbols: none fit)."""
    types = ["sliding_attention" if s == "W" else "full_attention" for s in m.layer_symbols]
    return {"layer_types": types, "sliding_window": m.local_attention.window if "W" in m.layer_symbols else None}
