"""One RoPE block of an HF config (`rope_parameters`, as transformers standardises it) <-> our
(theta, scaling) pair, in both directions: the donor readers and export-hf use the same mapping.

`scaling` is a dict of `RopeScalingConfig` fields (config/schema.py), or None for plain RoPE.
Every key of the HF block must be understood: an unknown one, or a scaling whose frequencies
change with the sequence length (dynamic NTK, LongRoPE), is a DonorError naming it.
"""

from __future__ import annotations

from typing import Any

from .spec import DonorError

# HF rope_parameters keys (besides rope_type / type / rope_theta / partial_rotary_factor) -> ours
_KEYS = {
    "linear": {"factor": "factor"},
    "llama3": {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
               "original_max_position_embeddings": "original_max_seq_len"},
    "yarn": {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len",
             "beta_fast": "beta_fast", "beta_slow": "beta_slow", "truncate": "truncate",
             "attention_factor": "attention_factor", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim"},
}
_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_REFUSED = {
    "dynamic": "dynamic NTK scaling recomputes the frequencies from the longest sequence seen so far, so a "
               "position's rotation depends on what ran before",
    "longrope": "LongRoPE switches between its short and long frequency sets with the sequence length",
}


def from_hf(params: dict, where: str, key: str = "rope_parameters") -> tuple[float, dict | None]:
    """(theta, scaling) of one standardised HF rope block."""

    def refuse(k: str, v: Any, why: str) -> DonorError:
        return DonorError(f"{where}: config key {key + '.' + k!r} = {v!r} is not supported: {why}")

    if not isinstance(params, dict):
        raise DonorError(f"{where}: config key {key!r} = {params!r} is not a RoPE parameter object")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params["rope_theta"])
    if kind == "default":
        names: dict[str, str] = {}
    elif kind in _KEYS:
        names = _KEYS[kind]
    elif kind in _REFUSED:
        raise refuse("rope_type", kind, _REFUSED[kind])
    else:
        raise refuse("rope_type", kind, f"known: default, {', '.join(_KEYS)}")
    for k in params:
        if k not in _COMMON and k not in names:
            raise refuse(k, params[k], f"not a parameter of {kind!r} RoPE as transformers computes it")
    if kind == "default":
        return theta, None
    scaling: dict[str, Any] = {"type": kind}
    for hf, ours in names.items():
        if params.get(hf) is not None:
            scaling[ours] = params[hf]
    if kind == "yarn" and "factor" not in scaling:  # transformers: the ratio of the two lengths
        raise refuse("factor", None, "YaRN needs its factor")
    for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
              "mscale", "mscale_all_dim"):
        if k in scaling:
            scaling[k] = float(scaling[k])
    return theta, scaling


def to_hf(theta: float, scaling) -> dict:
    """The HF rope block of (theta, scaling: a RopeScalingConfig or its dict, or None)."""
    s = scaling if scaling is None or isinstance(scaling, dict) else {
        k: getattr(scaling, k) for k in ("type", "factor", "original_max_seq_len", "low_freq_factor",
                                         "high_freq_factor", "beta_fast", "beta_slow", "truncate",
                                         "attention_factor", "mscale", "mscale_all_dim", "factors")}
    kind = "none" if s is None else s.get("type", "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if kind not in _KEYS:  # 'factors' (llama.cpp's rope_freqs) has no transformers form
        raise ValueError(f"RoPE scaling {kind!r} has no transformers rope_parameters form")
    out: dict[str, Any] = {"rope_type": kind, "rope_theta": theta}
    for hf, ours in _KEYS[kind].items():
        if s.get(ours) is not None:
            out[hf] = s[ours]
    return out
