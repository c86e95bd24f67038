"""Llama-family donors: `llama`, `mistral`, `qwen2` (SmolLM2 is a llama).

RMSNorm, SwiGLU MLP (`down(silu(gate(x)) * up(x))`), RoPE on the full head in HF's rotate_half
layout, optional GQA, separate q/k/v/o projections (copied as is). Biases: Llama per
`attention_bias` (q, k, v, o) and `mlp_bias`; Qwen2 always on q/k/v only; Mistral never.
When `tie_word_embeddings` is set, a saved `lm_head.weight` is dropped as a duplicate of the
embedding (HF ties it to the embedding on load whatever its stored value).
"""

from __future__ import annotations

from ._config import Cfg
from .keymap import KeyMap
from .spec import DonorSpec

MODEL_TYPES = ("llama", "mistral", "qwen2")

_BASE = {
    "embed_tokens.weight": "embed.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.norm1.weight",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.norm2.weight",
    "norm.weight": "norm_f.weight",
    # rotary cache buffers some older checkpoints carry
    "layers.{}.self_attn.rotary_emb.inv_freq": None,
    "rotary_emb.inv_freq": None,
}
for _p in "qkvo":
    for _kind in ("weight", "bias"):
        _BASE[f"layers.{{}}.self_attn.{_p}_proj.{_kind}"] = f"layers.{{}}.mixer.{_p}_proj.{_kind}"
for _p in ("gate", "up", "down"):
    for _kind in ("weight", "bias"):
        _BASE[f"layers.{{}}.mlp.{_p}_proj.{_kind}"] = f"layers.{{}}.mlp.{_p}_proj.{_kind}"

KEYMAP = KeyMap(
    prefixes=("model.", ""),  # *ForCausalLM, bare *Model
    anchor="embed_tokens.weight",
    base=_BASE,
    head={"lm_head.weight": "lm_head.weight"},
)


def spec_from_config(cfg: dict, where: str, dtype: str) -> DonorSpec:
    c = Cfg(cfg, where)
    family = cfg["model_type"]
    D, H = c.int("hidden_size"), c.int("num_attention_heads")
    KV = c.int("num_key_value_heads", default=H)
    if H % KV:
        raise c.unsupported("num_key_value_heads", KV, f"num_attention_heads {H} is not a multiple of it")
    head_dim = c.get("head_dim", default=None)
    if head_dim is None:
        if D % H:
            raise c.unsupported("num_attention_heads", H, f"hidden_size {D} is not a multiple of it")
        head_dim = D // H
    act = c.get("hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise c.unsupported("hidden_act", act, "the Llama-family MLP is supported as SwiGLU (silu) only")
    rotary_pct, theta = c.rope(default_pct=1.0, pct_keys=("partial_rotary_factor",))
    if rotary_pct != 1.0:  # transformers' Llama-family default RoPE rotates the whole head regardless
        raise c.unsupported("partial_rotary_factor", rotary_pct, "Llama-family RoPE rotates the whole head")
    c.full_attention_only()
    max_len = c.int("max_position_embeddings")
    if family == "mistral":
        window = cfg.get("sliding_window")
        if window is not None and window < max_len:
            raise c.unsupported("sliding_window", window,
                                f"sliding-window attention is used below max_position_embeddings {max_len}")
        qkv_bias = out_bias = mlp_bias = False
    elif family == "qwen2":
        if c.flag("use_sliding_window", False):
            raise c.unsupported("use_sliding_window", True, "sliding-window attention")
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        qkv_bias = out_bias = c.flag("attention_bias", False)
        mlp_bias = c.flag("mlp_bias", False)
    return DonorSpec(
        family=family, vocab_size=c.int("vocab_size"), d_model=D, n_layers=c.int("num_hidden_layers"),
        n_heads=H, n_kv_heads=KV, head_dim=int(head_dim), rotary_pct=rotary_pct, rope_theta=theta,
        norm="rmsnorm", norm_eps=float(c.get("rms_norm_eps", default=1e-6)), mlp="swiglu",
        d_mlp=c.int("intermediate_size"), mlp_bias=mlp_bias, qkv_bias=qkv_bias, attn_out_bias=out_bias,
        parallel_residual=False, tie_embeddings=c.flag("tie_word_embeddings", False), max_seq_len=max_len,
        bos_token_id=c.token_id("bos_token_id"), eos_token_id=c.token_id("eos_token_id"), dtype=dtype,
    )
