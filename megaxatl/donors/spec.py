"""The family-free description of a donor: `DonorSpec`, `DonorError`, and the canonical tensor set.

Canonical tensor names equal the parameter names of an all-attention megaxatl model, so a transfer
plan maps them one to one. Shapes (PyTorch `nn.Linear` layout, `(out, in)`):

    embed.weight                         (V, D)
    pos_embed.weight                     (max_seq_len, D)        learned positions (GPT-2) only
    layers.{i}.norm1.weight / .bias      (D,)        pre / sandwich norms; bias only for LayerNorm
    layers.{i}.mixer.q_proj.weight       (H*hd, D)   [+ .bias (H*hd,)   if qkv_bias]
    layers.{i}.mixer.k_proj.weight       (KV*hd, D)  [+ .bias (KV*hd,)  if qkv_bias]
    layers.{i}.mixer.v_proj.weight       (KV*hd, D)  [+ .bias (KV*hd,)  if qkv_bias]
    layers.{i}.mixer.q_norm.weight       (hd,) with qk_norm 'head', (H*hd,) with 'full'
    layers.{i}.mixer.k_norm.weight       (hd,) with qk_norm 'head', (KV*hd,) with 'full'
    layers.{i}.mixer.o_proj.weight       (D, H*hd)   [+ .bias (D,)      if attn_out_bias]
    layers.{i}.post_norm1.weight         (D,)        post / sandwich norms
    layers.{i}.norm2.weight / .bias      (D,)        pre / sandwich
    layers.{i}.mlp.gate_proj.weight      (d_mlp, D)  gated MLPs only [+ .bias if mlp_bias]
    layers.{i}.mlp.up_proj.weight        (d_mlp, D)  [+ .bias (d_mlp,) if mlp_bias]
    layers.{i}.mlp.down_proj.weight      (D, d_mlp)  [+ .bias (D,)     if mlp_bias]
    layers.{i}.post_norm2.weight         (D,)        post / sandwich
    norm_f.weight / .bias                (D,)
    lm_head.weight                       (V, D)      absent when tie_embeddings

Norm weights are stored as the donor stores them: with `norm_unit_offset` (Gemma) the norm
scales by (1 + weight).

Rotary convention: HF's rotate_half layout (transformers' Llama / GPT-NeoX modeling code): the
first `rotary_dim / 2` rows of each head pair with the next `rotary_dim / 2`, where
`rotary_dim = int(head_dim * rotary_pct)`; rows past `rotary_dim` are not rotated (NeoX partial).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megaxatl.config.schema import GATED_MLPS

FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma", "gemma2", "gemma3_text", "phi3",
            "olmo2", "stablelm")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "relu") + GATED_MLPS
NORM_PLACEMENTS = ("pre", "post", "sandwich")
QK_NORMS = ("none", "head", "full")


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
    # what the newer families add (ModelConfig's fields of the same meaning, config/schema.py)
    norm_placement: str = "pre"  # 'pre' | 'post' (OLMo-2) | 'sandwich' (Gemma-2/3)
    norm_unit_offset: bool = False  # norms scale by (1 + weight) (Gemma)
    embed_scale: float = 1.0
    logit_scale: float = 1.0
    final_softcap: float | None = None
    qk_norm: str = "none"  # 'head' (Qwen3, Gemma-3) | 'full' (OLMo-2)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    rope_scaling: dict | None = field(default=None, hash=False)  # RopeScalingConfig fields; None: plain
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # donor layers that attend within the window
    # the sliding layers' own RoPE (Gemma-3); None: the same as the other layers'
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = field(default=None, hash=False)

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
        if self.norm_placement not in NORM_PLACEMENTS or self.qk_norm not in QK_NORMS:
            raise DonorError(f"unknown norm placement / q-k norm {self.norm_placement!r} / {self.qk_norm!r}")
        if self.sliding_layers and self.sliding_window is None:
            raise DonorError("sliding layers without a sliding window")

    def attention_symbol(self, layer: int) -> str:
        """The pattern symbol of donor layer `layer`'s attention: 'W' sliding window, '*' full."""
        return "W" if layer in self.sliding_layers else "*"

    def local_rope(self) -> tuple[float, dict | None]:
        """(theta, scaling) of the sliding layers' RoPE."""
        theta = self.rope_theta if self.local_rope_theta is None else self.local_rope_theta
        return theta, self.rope_scaling if self.local_rope_scaling is None else self.local_rope_scaling

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

    def norm(name, dim=D):
        out[f"{name}.weight"] = (dim,)
        if ln_bias:
            out[f"{name}.bias"] = (dim,)

    pre, post = spec.norm_placement in ("pre", "sandwich"), spec.norm_placement in ("post", "sandwich")
    full_qk = spec.qk_norm == "full"
    for i in range(spec.n_layers):
        p = f"layers.{i}"
        if pre:
            norm(f"{p}.norm1")
        linear(f"{p}.mixer.q_proj", q_out, D, spec.qkv_bias)
        linear(f"{p}.mixer.k_proj", kv_out, D, spec.qkv_bias)
        linear(f"{p}.mixer.v_proj", kv_out, D, spec.qkv_bias)
        if spec.qk_norm != "none":
            norm(f"{p}.mixer.q_norm", q_out if full_qk else hd)
            norm(f"{p}.mixer.k_norm", kv_out if full_qk else hd)
        linear(f"{p}.mixer.o_proj", D, q_out, spec.attn_out_bias)
        if post:
            norm(f"{p}.post_norm1")
        if pre:
            norm(f"{p}.norm2")
        if spec.mlp in GATED_MLPS:
            linear(f"{p}.mlp.gate_proj", F, D, spec.mlp_bias)
        linear(f"{p}.mlp.up_proj", F, D, spec.mlp_bias)
        linear(f"{p}.mlp.down_proj", D, F, spec.mlp_bias)
        if post:
            norm(f"{p}.post_norm2")
    norm("norm_f")
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    return out
