"""The family-free description of a donor: `DonorSpec`, `DonorError`, and the canonical tensor set.

Canonical tensor names equal the parameter names of an all-attention megaxatl model, so a transfer
plan maps them one to one. Shapes (PyTorch `nn.Linear` layout, `(out, in)`):

    embed.weight                         (V, D)
    pos_embed.weight                     (max_seq_len, D)        learned positions (GPT-2) only
    layers.{i}.norm1.weight / .bias      (D,)                    bias only for LayerNorm families
    layers.{i}.mixer.q_proj.weight       (H*hd, D)   [+ .bias (H*hd,)   if qkv_bias]
    layers.{i}.mixer.k_proj.weight       (KV*hd, D)  [+ .bias (KV*hd,)  if qkv_bias]
    layers.{i}.mixer.v_proj.weight       (KV*hd, D)  [+ .bias (KV*hd,)  if qkv_bias]
    layers.{i}.mixer.o_proj.weight       (D, H*hd)   [+ .bias (D,)      if attn_out_bias]
    layers.{i}.norm2.weight / .bias      (D,)
    layers.{i}.mlp.gate_proj.weight      (d_mlp, D)  SwiGLU only [+ .bias if mlp_bias]
    layers.{i}.mlp.up_proj.weight        (d_mlp, D)  [+ .bias (d_mlp,) if mlp_bias]
    layers.{i}.mlp.down_proj.weight      (D, d_mlp)  [+ .bias (D,)     if mlp_bias]
    norm_f.weight / .bias                (D,)
    lm_head.weight                       (V, D)      absent when tie_embeddings

Rotary convention: HF's rotate_half layout (transformers' Llama / GPT-NeoX modeling code): the
first `rotary_dim / 2` rows of each head pair with the next `rotary_dim / 2`, where
`rotary_dim = int(head_dim * rotary_pct)`; rows past `rotary_dim` are not rotated (NeoX partial).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2", "gpt2")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "relu", "swiglu")


class DonorError(ValueError):
    """A donor that cannot be read faithfully: missing / corrupt file, unknown key or model type,
    unsupported config feature, wrong shape. The message names the file and the key."""


@dataclass(frozen=True)
class DonorSpec:
    """Architecture facts of a donor, independent of its family's naming."""

    family: str  # one of FAMILIES (the config's model_type)
    vocab_size: int  # V: rows of embed.weight (and lm_head.weight)
    d_model: int  # D
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # KV (== H without GQA)
    head_dim: int  # hd
    rotary_pct: float  # fraction of head_dim rotated; 0 for learned positions (GPT-2)
    rope_theta: float  # rotary base (0.0 when rotary_pct == 0)
    norm: str  # 'layernorm' | 'rmsnorm'
    norm_eps: float
    mlp: str  # 'gelu' (exact erf) | 'gelu_tanh' | 'relu' | 'swiglu' (silu(gate) * up)
    d_mlp: int
    mlp_bias: bool  # up/gate/down carry biases
    qkv_bias: bool
    attn_out_bias: bool
    parallel_residual: bool  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX) vs sequential
    tie_embeddings: bool  # lm_head is embed (no lm_head.weight tensor)
    max_seq_len: int  # max_position_embeddings / n_positions
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    dtype: str  # stored dtype of the weights, e.g. 'bfloat16' ('float32' after GGUF dequantization)
    has_pos_embed: bool = False  # learned absolute positions (pos_embed.weight), GPT-2

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise DonorError(f"unknown donor family {self.family!r}; known: {FAMILIES}")
        if self.norm not in NORMS:
            raise DonorError(f"unknown norm {self.norm!r}; known: {NORMS}")
        if self.mlp not in MLPS:
            raise DonorError(f"unknown mlp {self.mlp!r}; known: {MLPS}")
        if self.n_heads % self.n_kv_heads:
            raise DonorError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise DonorError(f"rotary_pct {self.rotary_pct} outside [0, 1]")

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (HF: `int(head_dim * partial_rotary_factor)`)."""
        return int(self.head_dim * self.rotary_pct)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def canonical_shapes(spec: DonorSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor a donor with `spec` has, in the stable order `Donor.keys()` uses."""
    D, V, hd = spec.d_model, spec.vocab_size, spec.head_dim
    q_out, kv_out, F = spec.n_heads * hd, spec.n_kv_heads * hd, spec.d_mlp
    ln_bias = spec.norm == "layernorm"
    out: dict[str, tuple[int, ...]] = {"embed.weight": (V, D)}
    if spec.has_pos_embed:
        out["pos_embed.weight"] = (spec.max_seq_len, D)

    def linear(name, n_out, n_in, bias):
        out[f"{name}.weight"] = (n_out, n_in)
        if bias:
            out[f"{name}.bias"] = (n_out,)

    def norm(name):
        out[f"{name}.weight"] = (D,)
        if ln_bias:
            out[f"{name}.bias"] = (D,)

    for i in range(spec.n_layers):
        p = f"layers.{i}"
        norm(f"{p}.norm1")
        linear(f"{p}.mixer.q_proj", q_out, D, spec.qkv_bias)
        linear(f"{p}.mixer.k_proj", kv_out, D, spec.qkv_bias)
        linear(f"{p}.mixer.v_proj", kv_out, D, spec.qkv_bias)
        linear(f"{p}.mixer.o_proj", D, q_out, spec.attn_out_bias)
        norm(f"{p}.norm2")
        if spec.mlp == "swiglu":
            linear(f"{p}.mlp.gate_proj", F, D, spec.mlp_bias)
        linear(f"{p}.mlp.up_proj", F, D, spec.mlp_bias)
        linear(f"{p}.mlp.down_proj", D, F, spec.mlp_bias)
    norm("norm_f")
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    return out
