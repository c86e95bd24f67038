"""GPT-2 donors (`model_type: gpt2`).

Learned absolute positions (`wpe` -> `pos_embed.weight`, kept as the model's `pos_embed`),
LayerNorm, GELU (tanh) MLP, biases everywhere, tied head. GPT-2 uses `Conv1D` layers whose weight is `(in, out)`:
every one is transposed into `nn.Linear`'s `(out, in)`, and the fused `c_attn` `(D, 3D)` is split
along its output columns into q, k, v (in that order) before the transpose.
"""

from __future__ import annotations

import torch

from ._config import PLAIN_ACTIVATIONS, Cfg
from .gpt_neox import NEOX_ACT
from .keymap import Fused, KeyMap, transposed
from .spec import DonorSpec

MODEL_TYPES = ("gpt2",)
HF_CLASSES = {"gpt2": "GPT2LMHeadModel"}


def _c_attn_split(t: torch.Tensor, dims) -> list[torch.Tensor]:
    D = dims.d_model
    if t.dim() == 1:  # bias (3D,)
        return [t[i * D:(i + 1) * D] for i in range(3)]
    return [t[:, i * D:(i + 1) * D].t() for i in range(3)]  # (D, 3D) -> q/k/v columns -> (D_out, D_in)


def _c_attn_join(parts: list[torch.Tensor], dims) -> torch.Tensor:
    return torch.cat(parts) if parts[0].dim() == 1 else torch.cat([p.t() for p in parts], dim=1)


def _split_c_attn(kind: str) -> Fused:
    how = "{} third of Conv1D c_attn (in, 3*out) columns" + (", transposed" if kind == "weight" else "")
    return Fused(tuple(f"layers.{{}}.mixer.{n}_proj.{kind}" for n in "qkv"), _c_attn_split, _c_attn_join, how)


KEYMAP = KeyMap(
    prefixes=("transformer.", ""),  # GPT2LMHeadModel, bare GPT2Model (the hub's gpt2 files)
    anchor="wte.weight",
    base={
        "wte.weight": "embed.weight",
        "wpe.weight": "pos_embed.weight",
        "h.{}.ln_1.weight": "layers.{}.norm1.weight",
        "h.{}.ln_1.bias": "layers.{}.norm1.bias",
        "h.{}.attn.c_attn.weight": _split_c_attn("weight"),
        "h.{}.attn.c_attn.bias": _split_c_attn("bias"),
        "h.{}.attn.c_proj.weight": transposed("layers.{}.mixer.o_proj.weight", "Conv1D transposed"),
        "h.{}.attn.c_proj.bias": "layers.{}.mixer.o_proj.bias",
        "h.{}.ln_2.weight": "layers.{}.norm2.weight",
        "h.{}.ln_2.bias": "layers.{}.norm2.bias",
        "h.{}.mlp.c_fc.weight": transposed("layers.{}.mlp.up_proj.weight", "Conv1D transposed"),
        "h.{}.mlp.c_fc.bias": "layers.{}.mlp.up_proj.bias",
        "h.{}.mlp.c_proj.weight": transposed("layers.{}.mlp.down_proj.weight", "Conv1D transposed"),
        "h.{}.mlp.c_proj.bias": "layers.{}.mlp.down_proj.bias",
        "ln_f.weight": "norm_f.weight",
        "ln_f.bias": "norm_f.bias",
        # causal-mask buffers of older saves
        "h.{}.attn.bias": None,
        "h.{}.attn.masked_bias": None,
    },
    head={"lm_head.weight": "lm_head.weight"},
)
KEYMAPS = dict.fromkeys(MODEL_TYPES, KEYMAP)


def spec_from_config(cfg: dict, where: str, dtype: str) -> DonorSpec:
    c = Cfg(cfg, where)
    D, H = c.int("n_embd", "hidden_size"), c.int("n_head", "num_attention_heads")
    if D % H:
        raise c.unsupported("n_head", H, f"n_embd {D} is not a multiple of it")
    act = c.get("activation_function", default="gelu_new")
    if act not in PLAIN_ACTIVATIONS:
        raise c.unsupported("activation_function", act, f"known: {sorted(PLAIN_ACTIVATIONS)}")
    if not c.flag("scale_attn_weights", True):
        raise c.unsupported("scale_attn_weights", False, "attention scores are always scaled by 1/sqrt(hd)")
    if c.flag("scale_attn_by_inverse_layer_idx", False):
        raise c.unsupported("scale_attn_by_inverse_layer_idx", True, "per-layer attention scaling")
    if c.flag("add_cross_attention", False):
        raise c.unsupported("add_cross_attention", True, "decoder-only donors only")
    return DonorSpec(
        family="gpt2", vocab_size=c.int("vocab_size"), d_model=D, n_layers=c.int("n_layer", "num_hidden_layers"),
        n_heads=H, n_kv_heads=H, head_dim=D // H, rotary_pct=0.0, rope_theta=0.0,
        norm="layernorm", norm_eps=float(c.get("layer_norm_epsilon", default=1e-5)),
        mlp=PLAIN_ACTIVATIONS[act], d_mlp=int(c.get("n_inner", default=None) or 4 * D), mlp_bias=True,
        qkv_bias=True, attn_out_bias=True, parallel_residual=False,
        tie_embeddings=c.flag("tie_word_embeddings", True), max_seq_len=c.int("n_positions", "max_position_embeddings"),
        bos_token_id=c.token_id("bos_token_id"), eos_token_id=c.token_id("eos_token_id"), dtype=dtype,
        has_pos_embed=True,
    )


def hf_config(m, model_type: str) -> dict:
    return {"vocab_size": m.vocab_size, "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
            "n_inner": m.d_mlp, "n_positions": m.max_seq_len, "activation_function": NEOX_ACT.get(m.mlp, "gelu"),
            "layer_norm_epsilon": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
            "initializer_range": m.init_std}
