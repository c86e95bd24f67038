"""GPT-NeoX / Pythia donors (`model_type: gpt_neox`).

Parallel residual (optional), rotary on `rotary_pct` of each head's dims, LayerNorm, GELU MLP with
biases, untied `embed_out`. The attention input projection is FUSED per head: `query_key_value` is
`(H * 3 * hd, D)` laid out as `(H, 3, hd, D)` (HF's `view(..., H, 3 * hd)` then `chunk(3)`), so q is
`w.view(H, 3, hd, D)[:, 0].reshape(H * hd, D)`, already in HF's rotate_half convention.
"""

from __future__ import annotations

import torch

from ._config import PLAIN_ACTIVATIONS, Cfg
from .keymap import KeyMap, Op
from .spec import DonorSpec

MODEL_TYPES = ("gpt_neox",)


def _qkv_part(part: int):
    def fn(t: torch.Tensor, spec: DonorSpec) -> torch.Tensor:
        H, hd = spec.n_heads, spec.head_dim
        # weight (H*3*hd, D) -> (H, 3, hd, D); bias (H*3*hd,) -> (H, 3, hd)
        return t.view(H, 3, hd, *t.shape[1:])[:, part].reshape(H * hd, *t.shape[1:])

    return fn


def _split_qkv(kind: str) -> tuple[Op, ...]:
    how = "{} of per-head fused query_key_value, viewed (H, 3, hd, ...)"
    return tuple(Op(f"layers.{{}}.mixer.{n}_proj.{kind}", _qkv_part(i), how.format(n)) for i, n in enumerate("qkv"))


KEYMAP = KeyMap(
    prefixes=("gpt_neox.", ""),  # GPTNeoXForCausalLM, bare GPTNeoXModel
    anchor="embed_in.weight",
    base={
        "embed_in.weight": "embed.weight",
        "layers.{}.input_layernorm.weight": "layers.{}.norm1.weight",
        "layers.{}.input_layernorm.bias": "layers.{}.norm1.bias",
        "layers.{}.attention.query_key_value.weight": _split_qkv("weight"),
        "layers.{}.attention.query_key_value.bias": _split_qkv("bias"),
        "layers.{}.attention.dense.weight": "layers.{}.mixer.o_proj.weight",
        "layers.{}.attention.dense.bias": "layers.{}.mixer.o_proj.bias",
        "layers.{}.post_attention_layernorm.weight": "layers.{}.norm2.weight",
        "layers.{}.post_attention_layernorm.bias": "layers.{}.norm2.bias",
        "layers.{}.mlp.dense_h_to_4h.weight": "layers.{}.mlp.up_proj.weight",
        "layers.{}.mlp.dense_h_to_4h.bias": "layers.{}.mlp.up_proj.bias",
        "layers.{}.mlp.dense_4h_to_h.weight": "layers.{}.mlp.down_proj.weight",
        "layers.{}.mlp.dense_4h_to_h.bias": "layers.{}.mlp.down_proj.bias",
        "final_layer_norm.weight": "norm_f.weight",
        "final_layer_norm.bias": "norm_f.bias",
        # buffers older transformers versions saved with the weights
        "layers.{}.attention.rotary_emb.inv_freq": None,
        "layers.{}.attention.bias": None,
        "layers.{}.attention.masked_bias": None,
        "rotary_emb.inv_freq": None,
    },
    # the files name the head embed_out; transformers 5 calls the module's parameter lm_head (and
    # renames on load / save), so a state dict saved straight from the module has lm_head
    head={"embed_out.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight"},
)


def spec_from_config(cfg: dict, where: str, dtype: str) -> DonorSpec:
    c = Cfg(cfg, where)
    D, H = c.int("hidden_size"), c.int("num_attention_heads")
    if D % H:
        raise c.unsupported("num_attention_heads", H, f"hidden_size {D} is not a multiple of it")
    act = c.get("hidden_act", default="gelu")
    if act not in PLAIN_ACTIVATIONS:
        raise c.unsupported("hidden_act", act, f"known: {sorted(PLAIN_ACTIVATIONS)}")
    rotary_pct, theta = c.rope(default_pct=0.25, pct_keys=("rotary_pct", "partial_rotary_factor"),
                               theta_keys=("rope_theta", "rotary_emb_base"))
    c.full_attention_only()
    bias = c.flag("attention_bias", True)  # transformers 4.x NeoX always had attention biases
    return DonorSpec(
        family="gpt_neox", vocab_size=c.int("vocab_size"), d_model=D, n_layers=c.int("num_hidden_layers"),
        n_heads=H, n_kv_heads=H, head_dim=D // H, rotary_pct=rotary_pct, rope_theta=theta,
        norm="layernorm", norm_eps=float(c.get("layer_norm_eps", default=1e-5)),
        mlp=PLAIN_ACTIVATIONS[act], d_mlp=c.int("intermediate_size"), mlp_bias=True,
        qkv_bias=bias, attn_out_bias=bias, parallel_residual=c.flag("use_parallel_residual", True),
        tie_embeddings=c.flag("tie_word_embeddings", False), max_seq_len=c.int("max_position_embeddings"),
        bos_token_id=c.token_id("bos_token_id"), eos_token_id=c.token_id("eos_token_id"), dtype=dtype,
    )
