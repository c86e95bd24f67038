"""Gemma-family donors: `gemma`, `gemma2`, `gemma3_text` (Gemma-3's text model, e.g. gemma-3-270m).

All three: RMSNorm scaling by (1 + weight) (weights stored as the donor stores them, model
`norm_unit_offset`), the token embedding times sqrt(hidden_size), a GeGLU MLP with tanh GELU
(`down(gelu_tanh(gate(x)) * up(x))`), a tied head by default. On top:

    gemma2       sandwich norms (input / post_attention around the mixer, pre_ / post_feedforward
                 around the MLP), softmax scale query_pre_attn_scalar**-0.5, tanh soft-capping of
                 the attention scores and the final logits, sliding-window layers by layer_types
    gemma3_text  as gemma2, plus a per-head q/k RMSNorm, sliding layers with their own RoPE base
                 (rope_parameters.sliding_attention, 10000 by default) and RoPE scaling on the
                 global layers only; soft-capping off by default

Bidirectional attention (`use_bidirectional_attention`, an embedding-model setting) is refused.
"""

from __future__ import annotations

from ._config import Cfg, hf_common, hf_layer_types
from . import rope as rope_map
from .keymap import KeyMap, separate_proj_keys
from .spec import DonorSpec

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
HF_CLASSES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}

_BASE = {
    "embed_tokens.weight": "embed.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.norm1.weight",
    "layers.{}.self_attn.q_norm.weight": "layers.{}.mixer.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "layers.{}.mixer.k_norm.weight",
    "norm.weight": "norm_f.weight",
}
_BASE |= separate_proj_keys(mlp_bias=False)

_HEAD = {"lm_head.weight": "lm_head.weight"}
# Gemma (1): the Llama block; post_attention_layernorm is the MLP's (pre) norm
_GEMMA = KeyMap(("model.", ""), "embed_tokens.weight",
                _BASE | {"layers.{}.post_attention_layernorm.weight": "layers.{}.norm2.weight"}, _HEAD)
# Gemma-2 / 3: the sandwich; post_attention_layernorm is the mixer's post norm
_SANDWICH = KeyMap(("model.", ""), "embed_tokens.weight", _BASE | {
    "layers.{}.post_attention_layernorm.weight": "layers.{}.post_norm1.weight",
    "layers.{}.pre_feedforward_layernorm.weight": "layers.{}.norm2.weight",
    "layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_norm2.weight",
}, _HEAD)
KEYMAPS = {"gemma": _GEMMA, "gemma2": _SANDWICH, "gemma3_text": _SANDWICH}


def spec_from_config(cfg: dict, where: str, dtype: str) -> DonorSpec:
    c = Cfg(cfg, where)
    family = cfg["model_type"]
    D, H, KV, head_dim = c.dims()
    act_key = "hidden_act" if family == "gemma" else "hidden_activation"
    act = c.get(act_key, default="gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise c.unsupported(act_key, act, "the Gemma MLP is supported as GeGLU with tanh GELU")
    if c.cfg.get("use_bidirectional_attention"):
        raise c.unsupported("use_bidirectional_attention", True, "a causal LM donor attends to the past only")
    bias = c.flag("attention_bias", False)
    out = dict(c.common(family, dtype, tie_default=True), d_model=D, n_heads=H, n_kv_heads=KV, head_dim=head_dim,
               rotary_pct=1.0, norm="rmsnorm", norm_eps=float(c.get("rms_norm_eps", default=1e-6)),
               norm_unit_offset=True, embed_scale=D ** 0.5, mlp="geglu_tanh", d_mlp=c.int("intermediate_size"),
               mlp_bias=False, qkv_bias=bias, attn_out_bias=bias, parallel_residual=False)
    if family == "gemma":
        _, theta, scaling = c.rope(default_pct=1.0)
        return DonorSpec(**out, rope_theta=theta, rope_scaling=scaling)
    scalar = c.get("query_pre_attn_scalar", default=256)
    window, sliding = c.windows(types_apply=True)
    out |= dict(norm_placement="sandwich", sliding_window=window, sliding_layers=sliding,
                attn_scale=None if scalar == head_dim else float(scalar) ** -0.5,
                attn_softcap=_cap(c, "attn_logit_softcapping"), final_softcap=_cap(c, "final_logit_softcapping"))
    if family == "gemma2":
        _, theta, scaling = c.rope(default_pct=1.0)
        return DonorSpec(**out, rope_theta=theta, rope_scaling=scaling)
    params = c.get("rope_parameters")  # one block per layer type
    if not isinstance(params, dict) or set(params) != {"full_attention", "sliding_attention"}:
        raise c.unsupported("rope_parameters", params, "Gemma-3 has one RoPE block for full and one for sliding layers")
    theta, scaling = rope_map.from_hf(params["full_attention"], where, "rope_parameters.full_attention")
    local_theta, local_scaling = rope_map.from_hf(params["sliding_attention"], where, "rope_parameters.sliding_attention")
    local_same = (local_theta, local_scaling) == (theta, scaling)
    return DonorSpec(**out, qk_norm="head", rope_theta=theta, rope_scaling=scaling,
                     local_rope_theta=None if local_same else local_theta,
                     local_rope_scaling=None if local_same else (local_scaling or {"type": "none"}))


def _cap(c: Cfg, key: str) -> float | None:
    v = c.get(key, default=None)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
        raise c.unsupported(key, v, "a soft-cap is a positive number (or null)")
    return None if v is None else float(v)


def hf_config(m, model_type: str) -> dict:
    out = hf_common(m) | {"rms_norm_eps": m.norm_eps, "attention_bias": m.qkv_bias,
                          ("hidden_act" if model_type == "gemma" else "hidden_activation"): "gelu_pytorch_tanh"}
    if model_type == "gemma":
        return out | {"rope_parameters": rope_map.to_hf(m.rope_theta, m.rope_scaling)}
    scale = m.attn_scale
    # an integer query_pre_attn_scalar (the config's type) that gives exactly this scale, or a
    # near one that the reader then shows to differ
    out |= hf_layer_types(m) | {
        "query_pre_attn_scalar": m.attn_head_dim if scale is None else max(1, round(scale ** -2)),
        "attn_logit_softcapping": m.attn_softcap, "final_logit_softcapping": m.final_softcap}
    if model_type == "gemma2":
        return out | {"rope_parameters": rope_map.to_hf(m.rope_theta, m.rope_scaling)}
    local_theta, local_scaling = m.rope_of("W")
    return out | {"rope_parameters": {"full_attention": rope_map.to_hf(m.rope_theta, m.rope_scaling),
                                      "sliding_attention": rope_map.to_hf(local_theta, local_scaling)}}
