"""Phi-3 donors (`model_type: phi3`: Phi-3 / Phi-3.5 mini and medium, Phi-4-mini).

The Llama block (RMSNorm, SwiGLU, RoPE in HF's rotate_half layout, partial rotary allowed) with
two FUSED projections: `qkv_proj` stacks q (H*hd rows), k and v (KV*hd rows each), and
`gate_up_proj` stacks gate then up (d_mlp rows each, HF's `chunk(2)`); each part is a row slice.
A `sliding_window` applies to every layer. The 128k variants' LongRoPE switches its frequencies
with the sequence length and is refused (donors/rope.py).
"""

from __future__ import annotations

from ._config import Cfg, hf_common, hf_layer_types, hf_rope
from .keymap import KeyMap, rows_split
from .spec import DonorSpec

MODEL_TYPES = ("phi3",)
HF_CLASSES = {"phi3": "Phi3ForCausalLM"}


def _qkv_sizes(dims) -> tuple[int, int, int]:
    kv = dims.n_kv_heads * dims.head_dim
    return dims.n_heads * dims.head_dim, kv, kv


KEYMAP = KeyMap(
    prefixes=("model.", ""),
    anchor="embed_tokens.weight",
    base={
        "embed_tokens.weight": "embed.weight",
        "layers.{}.input_layernorm.weight": "layers.{}.norm1.weight",
        "layers.{}.self_attn.qkv_proj.weight": rows_split(
            tuple(f"layers.{{}}.mixer.{n}_proj.weight" for n in "qkv"), _qkv_sizes, "{} rows of fused qkv_proj"),
        "layers.{}.self_attn.o_proj.weight": "layers.{}.mixer.o_proj.weight",
        "layers.{}.post_attention_layernorm.weight": "layers.{}.norm2.weight",
        "layers.{}.mlp.gate_up_proj.weight": rows_split(
            ("layers.{}.mlp.gate_proj.weight", "layers.{}.mlp.up_proj.weight"), lambda d: (d.d_mlp, d.d_mlp),
            "{} half of fused gate_up_proj"),
        "layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
        "norm.weight": "norm_f.weight",
    },
    head={"lm_head.weight": "lm_head.weight"},
)
KEYMAPS = {"phi3": KEYMAP}


def spec_from_config(cfg: dict, where: str, dtype: str) -> DonorSpec:
    c = Cfg(cfg, where)
    D, H, KV, head_dim = c.dims()
    act = c.get("hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise c.unsupported("hidden_act", act, "the Phi-3 MLP is supported as SwiGLU (silu) only")
    rotary_pct, theta, scaling = c.rope(default_pct=1.0, pct_keys=("partial_rotary_factor",))
    window, sliding = c.windows(types_apply=False)
    return DonorSpec(
        **c.common("phi3", dtype), d_model=D, n_heads=H, n_kv_heads=KV, head_dim=head_dim, rotary_pct=rotary_pct,
        rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", norm_eps=float(c.get("rms_norm_eps", default=1e-5)),
        mlp="swiglu", d_mlp=c.int("intermediate_size"), mlp_bias=False, qkv_bias=False, attn_out_bias=False,
        parallel_residual=False, sliding_window=window, sliding_layers=sliding,
    )


def hf_config(m, model_type: str) -> dict:
    rope = hf_rope(m, partial=True)
    return hf_common(m) | {"hidden_act": "silu", "rms_norm_eps": m.norm_eps, "rope_parameters": rope,
                           "partial_rotary_factor": m.rotary_pct, "original_max_position_embeddings": m.max_seq_len,
                           "sliding_window": hf_layer_types(m)["sliding_window"]}
