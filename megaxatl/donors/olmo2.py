"""OLMo-2 donors (`model_type: olmo2`).

Llama's projections and SwiGLU MLP, but the norms sit AFTER each sublayer (model
`norm_placement: post`: x + post_norm1(attn(x)), x + post_norm2(mlp(x)); HF names them
post_attention_layernorm / post_feedforward_layernorm), and q / k are RMS-normalised over the
whole projection, before the head split (weights (H*hd,) and (KV*hd,): `qk_norm: full`).
"""

from __future__ import annotations

from ._config import Cfg, hf_common, hf_rope
from .keymap import KeyMap, separate_proj_keys
from .spec import DonorSpec

MODEL_TYPES = ("olmo2",)
HF_CLASSES = {"olmo2": "Olmo2ForCausalLM"}

_BASE = {
    "embed_tokens.weight": "embed.weight",
    "layers.{}.self_attn.q_norm.weight": "layers.{}.mixer.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "layers.{}.mixer.k_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.post_norm1.weight",
    "layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_norm2.weight",
    "norm.weight": "norm_f.weight",
    "layers.{}.self_attn.rotary_emb.inv_freq": None,
    "rotary_emb.inv_freq": None,
}
_BASE |= separate_proj_keys(mlp_bias=False)

KEYMAP = KeyMap(("model.", ""), "embed_tokens.weight", _BASE, {"lm_head.weight": "lm_head.weight"})
KEYMAPS = {"olmo2": KEYMAP}


def spec_from_config(cfg: dict, where: str, dtype: str) -> DonorSpec:
    c = Cfg(cfg, where)
    D, H, KV, head_dim = c.dims(head_dim_key=False)
    act = c.get("hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise c.unsupported("hidden_act", act, "the OLMo-2 MLP is supported as SwiGLU (silu) only")
    _, theta, scaling = c.rope(default_pct=1.0)
    bias = c.flag("attention_bias", False)
    return DonorSpec(
        **c.common("olmo2", dtype), d_model=D, n_heads=H, n_kv_heads=KV, head_dim=head_dim, rotary_pct=1.0,
        rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", norm_eps=float(c.get("rms_norm_eps", default=1e-6)),
        mlp="swiglu", d_mlp=c.int("intermediate_size"), mlp_bias=False, qkv_bias=bias, attn_out_bias=bias,
        parallel_residual=False, norm_placement="post", qk_norm="full",
    )


def hf_config(m, model_type: str) -> dict:
    out = hf_common(m)
    del out["head_dim"]  # always hidden_size / heads
    return out | {"hidden_act": "silu", "rms_norm_eps": m.norm_eps, "attention_bias": m.qkv_bias,
                  "rope_parameters": hf_rope(m)}
