"""Llama-family donors: `llama`, `mistral`, `qwen2`, `qwen3` (SmolLM2 is a llama).

RMSNorm, SwiGLU MLP (`down(silu(gate(x)) * up(x))`), RoPE on the full head in HF's rotate_half
layout (with its scalings: llama3, linear, yarn), optional GQA, separate q/k/v/o projections
(copied as is). Biases: Llama and Qwen3 per `attention_bias` (q, k, v, o) and Llama's
`mlp_bias`; Qwen2 always on q/k/v only; Mistral never. Qwen3 normalises each q / k head (RMSNorm
over head_dim, one weight for all heads) before RoPE. Sliding windows: Mistral's applies to every
layer; Qwen2/3 slide on the layers `layer_types` names. When `tie_word_embeddings` is set, a saved
`lm_head.weight` is dropped as a duplicate of the embedding (HF ties it to the embedding on load
whatever its stored value).
"""

from __future__ import annotations

from ._config import Cfg, hf_common, hf_layer_types, hf_rope
from .keymap import KeyMap, separate_proj_keys
from .spec import DonorSpec

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}

_BASE = {
    "embed_tokens.weight": "embed.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.norm1.weight",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.norm2.weight",
    "layers.{}.self_attn.q_norm.weight": "layers.{}.mixer.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "layers.{}.mixer.k_norm.weight",
    "norm.weight": "norm_f.weight",
    # rotary cache buffers some older checkpoints carry
    "layers.{}.self_attn.rotary_emb.inv_freq": None,
    "rotary_emb.inv_freq": None,
}
_BASE |= separate_proj_keys(mlp_bias=True)

KEYMAP = KeyMap(
    prefixes=("model.", ""),  # *ForCausalLM, bare *Model
    anchor="embed_tokens.weight",
    base=_BASE,
    head={"lm_head.weight": "lm_head.weight"},
)
KEYMAPS = dict.fromkeys(MODEL_TYPES, KEYMAP)


def spec_from_config(cfg: dict, where: str, dtype: str) -> DonorSpec:
    c = Cfg(cfg, where)
    family = cfg["model_type"]
    D, H, KV, head_dim = c.dims()
    act = c.get("hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise c.unsupported("hidden_act", act, "the Llama-family MLP is supported as SwiGLU (silu) only")
    rotary_pct, theta, scaling = c.rope(default_pct=1.0)
    if rotary_pct != 1.0:  # transformers' Llama-family RoPE rotates the whole head regardless
        raise c.unsupported("partial_rotary_factor", rotary_pct, "Llama-family RoPE rotates the whole head")
    window, sliding = c.windows(types_apply=family in ("qwen2", "qwen3"))
    mlp_bias, qk_norm = False, "none"
    if family == "mistral":
        qkv_bias = out_bias = False
    elif family == "qwen2":
        qkv_bias, out_bias = True, False
    else:
        qkv_bias = out_bias = c.flag("attention_bias", False)
        if family == "llama":
            mlp_bias = c.flag("mlp_bias", False)
        else:
            qk_norm = "head"
    return DonorSpec(
        **c.common(family, dtype), d_model=D, n_heads=H, n_kv_heads=KV, head_dim=head_dim, rotary_pct=1.0,
        rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", norm_eps=float(c.get("rms_norm_eps", default=1e-6)),
        mlp="swiglu", d_mlp=c.int("intermediate_size"), mlp_bias=mlp_bias, qkv_bias=qkv_bias, attn_out_bias=out_bias,
        parallel_residual=False, qk_norm=qk_norm, sliding_window=window, sliding_layers=sliding,
    )


def hf_config(m, model_type: str) -> dict:
    """The HF config of the ModelConfig `m` as a `model_type` model (export-hf; the reader above
    decides whether it describes `m` exactly)."""
    out = hf_common(m) | {"hidden_act": "silu", "rms_norm_eps": m.norm_eps, "rope_parameters": hf_rope(m)}
    windows = hf_layer_types(m)
    if model_type == "llama":
        return out | {"attention_bias": m.qkv_bias, "mlp_bias": m.mlp_bias}
    if model_type == "mistral":
        return out | {"sliding_window": windows["sliding_window"]}
    use = windows["sliding_window"] is not None
    # Qwen2/3 name their sliding layers by max_window_layers; layer_types, given, is what they read
    out |= windows | {"use_sliding_window": use, "max_window_layers": 0 if use else m.n_layers}
    if model_type == "qwen3":
        out["attention_bias"] = m.qkv_bias
    return out
