"""GPT-NeoX / Pythia donors (`model_type: gpt_neox`).

Parallel residual (optional), rotary on `rotary_pct` of each head's dims, LayerNorm, GELU MLP with
biases, untied `embed_out`. The attention input projection is FUSED per head: `query_key_value` is
`(H * 3 * hd, D)` laid out as `(H, 3, hd, D)` (HF's `view(..., H, 3 * hd)` then `chunk(3)`), so q is
`w.view(H, 3, hd, D)[:, 0].reshape(H * hd, D)`, already in HF's rotate_half convention.
"""

from __future__ import annotations

import torch

from ._config import PLAIN_ACTIVATIONS, Cfg, hf_common, hf_rope
from .keymap import Fused, KeyMap
from .spec import DonorSpec

MODEL_TYPES = ("gpt_neox",)
HF_CLASSES = {"gpt_neox": "GPTNeoXForCausalLM"}
# the canonical MLP kinds the GPT-NeoX config can name
NEOX_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _qkv_split(t: torch.Tensor, dims) -> list[torch.Tensor]:
    H, hd = dims.n_heads, dims.head_dim
    # weight (H*3*hd, D) -> (H, 3, hd, D); bias (H*3*hd,) -> (H, 3, hd)
    v = t.view(H, 3, hd, *t.shape[1:])
    return [v[:, i].reshape(H * hd, *t.shape[1:]) for i in range(3)]


def _qkv_join(parts: list[torch.Tensor], dims) -> torch.Tensor:
    H, hd = dims.n_heads, dims.head_dim
    return torch.stack([p.reshape(H, hd, *p.shape[1:]) for p in parts], dim=1).reshape(-1, *parts[0].shape[1:])


def _split_qkv(kind: str) -> Fused:
    return Fused(tuple(f"layers.{{}}.mixer.{n}_proj.{kind}" for n in "qkv"), _qkv_split, _qkv_join,
                 "{} of per-head fused query_key_value, viewed (H, 3, hd, ...)")


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
KEYMAPS = dict.fromkeys(MODEL_TYPES, KEYMAP)


def spec_from_config(cfg: dict, where: str, dtype: str) -> DonorSpec:
    c = Cfg(cfg, where)
    D, H, _, hd = c.dims(head_dim_key=False)
    act = c.get("hidden_act", default="gelu")
    if act not in PLAIN_ACTIVATIONS:
        raise c.unsupported("hidden_act", act, f"known: {sorted(PLAIN_ACTIVATIONS)}")
    rotary_pct, theta, scaling = c.rope(default_pct=0.25, pct_keys=("rotary_pct", "partial_rotary_factor"),
                                        theta_keys=("rope_theta", "rotary_emb_base"))
    bias = c.flag("attention_bias", True)  # transformers 4.x NeoX always had attention biases
    return DonorSpec(
        **c.common("gpt_neox", dtype), d_model=D, n_heads=H, n_kv_heads=H, head_dim=hd, rotary_pct=rotary_pct,
        rope_theta=theta, rope_scaling=scaling, norm="layernorm", norm_eps=float(c.get("layer_norm_eps", default=1e-5)),
        mlp=PLAIN_ACTIVATIONS[act], d_mlp=c.int("intermediate_size"), mlp_bias=True,
        qkv_bias=bias, attn_out_bias=bias, parallel_residual=c.flag("use_parallel_residual", True),
    )


def hf_config(m, model_type: str) -> dict:
    out = hf_common(m)
    for k in ("num_key_value_heads", "head_dim"):  # always H heads of hidden_size / H
        del out[k]
    return out | {"hidden_act": NEOX_ACT.get(m.mlp, "gelu"), "layer_norm_eps": m.norm_eps,
                  "use_parallel_residual": m.parallel_residual, "attention_bias": m.qkv_bias,
                  "rope_parameters": hf_rope(m, partial=True)}
