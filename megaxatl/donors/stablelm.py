"""StableLM donors (`model_type: stablelm`: StableLM-2 1.6B, StableLM-3B-4E1T, StableLM-Zephyr).

LayerNorm with biases, SwiGLU MLP without biases, partial rotary (`partial_rotary_factor`, 0.25
for StableLM-2) in HF's rotate_half layout, q/k/v biases per `use_qkv_bias` (o never).
Refused: `qk_layernorm` (a separate LayerNorm per head, StableLM-2-12B) and
`use_parallel_residual` (attention and MLP reading ONE shared norm).
"""

from __future__ import annotations

from ._config import Cfg, hf_common, hf_rope
from .keymap import KeyMap, separate_proj_keys
from .spec import DonorSpec

MODEL_TYPES = ("stablelm",)
HF_CLASSES = {"stablelm": "StableLmForCausalLM"}

_BASE = {
    "embed_tokens.weight": "embed.weight",
    "norm.weight": "norm_f.weight",
    "norm.bias": "norm_f.bias",
    "layers.{}.self_attn.rotary_emb.inv_freq": None,
    "rotary_emb.inv_freq": None,
}
for _hf, _ours in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2")):
    for _kind in ("weight", "bias"):
        _BASE[f"layers.{{}}.{_hf}.{_kind}"] = f"layers.{{}}.{_ours}.{_kind}"
_BASE |= separate_proj_keys(mlp_bias=False)

KEYMAP = KeyMap(("model.", ""), "embed_tokens.weight", _BASE, {"lm_head.weight": "lm_head.weight"})
KEYMAPS = {"stablelm": KEYMAP}


def spec_from_config(cfg: dict, where: str, dtype: str) -> DonorSpec:
    c = Cfg(cfg, where)
    D, H, KV, head_dim = c.dims(head_dim_key=False)
    act = c.get("hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise c.unsupported("hidden_act", act, "the StableLM MLP is supported as SwiGLU (silu) only")
    if c.flag("qk_layernorm", False):
        raise c.unsupported("qk_layernorm", True, "a separate LayerNorm per head")
    if c.flag("use_parallel_residual", False):
        raise c.unsupported("use_parallel_residual", True, "attention and MLP share one norm")
    rotary_pct, theta, scaling = c.rope(default_pct=0.25, pct_keys=("partial_rotary_factor",))
    return DonorSpec(
        **c.common("stablelm", dtype), d_model=D, n_heads=H, n_kv_heads=KV, head_dim=head_dim, rotary_pct=rotary_pct,
        rope_theta=theta, rope_scaling=scaling, norm="layernorm", norm_eps=float(c.get("layer_norm_eps", default=1e-5)),
        mlp="swiglu", d_mlp=c.int("intermediate_size"), mlp_bias=False, qkv_bias=c.flag("use_qkv_bias", False),
        attn_out_bias=False, parallel_residual=False,
    )


def hf_config(m, model_type: str) -> dict:
    out = hf_common(m)
    del out["head_dim"]  # always hidden_size / heads
    return out | {"hidden_act": "silu", "layer_norm_eps": m.norm_eps, "use_qkv_bias": m.qkv_bias,
                  "qk_layernorm": False, "use_parallel_residual": False, "rope_parameters": hf_rope(m, partial=True),
                  "partial_rotary_factor": m.rotary_pct}
