"""The one config schema: model, transfer, parallel, data, train, logging and kernels sections.

Plain dataclasses so that the model code reads attributes, not dict keys. Loading from JSON,
type checking and the cross-field checks live in `load.py`; the per-dataclass `check()` methods
here say what a value may be and why, and return problems as (key, reason) pairs so that the
loader can name the file and the full key path in its message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megaxatl.config.kernels import KernelsConfig
from megaxatl.config.pattern import ATTENTION_SYMBOLS, parse_pattern

Problems = list[tuple[str, str]]


def at_least(obj, keys: tuple[str, ...], lo: int = 1) -> Problems:
    """(key, reason) for each of `keys` whose value on `obj` is below `lo`."""
    return [(k, f"must be >= {lo}, got {getattr(obj, k)}") for k in keys if getattr(obj, k) < lo]


@dataclass
class _SSMConfig:
    """What Mamba-1 and Mamba-2 mixers share: width, conv, dt initialisation, biases."""

    d_state: int = 16
    d_conv: int = 4
    expand: float = 2.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    proj_bias: bool = False

    def check(self, d_model: int) -> Problems:
        out: Problems = []
        d_inner = self.expand * d_model
        if d_inner != int(d_inner):
            out.append(("expand", f"expand * d_model = {d_inner} is not a whole number of channels"))
        if not 0 < self.dt_min <= self.dt_max:
            out.append(("dt_min", f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}"))
        out += at_least(self, ("d_state", "d_conv"))
        return out


@dataclass
class MambaConfig(_SSMConfig):
    """Mamba-1 selective SSM mixer (mamba-ssm's defaults)."""

    # None -> ceil(d_model / 16), as mamba-ssm's "auto"
    dt_rank: Optional[int] = None

    def check(self, d_model: int) -> Problems:
        out = super().check(d_model)
        if self.dt_rank is not None and self.dt_rank < 1:
            out.append(("dt_rank", "must be >= 1 (or null for ceil(d_model/16))"))
        return out


@dataclass
class Mamba2Config(_SSMConfig):
    """Mamba-2 (SSD) mixer, mamba-ssm's Mamba2 layout."""

    d_state: int = 64
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 64

    def check(self, d_model: int) -> Problems:
        out = super().check(d_model)
        if out:
            return out
        d_inner = int(self.expand * d_model)
        if d_inner % self.head_dim:
            out.append(("head_dim", f"d_inner {d_inner} is not divisible by head_dim {self.head_dim}"))
        elif (d_inner // self.head_dim) % self.n_groups:
            out.append(("n_groups", f"{d_inner // self.head_dim} heads are not divisible by n_groups {self.n_groups}"))
        if self.chunk_size < 1:
            out.append(("chunk_size", "must be >= 1"))
        return out


FORMS = ("chunk", "parallel", "recurrent")


@dataclass
class _LinearAttnConfig:
    """What the retention and GLA mixers share: the form, the head split, the chunk, the norm."""

    # 'chunk' (training, any length; kernels' gla_scan), 'parallel' (quadratic, short
    # sequences), 'recurrent' (step by step: a reference). All three compute the same function.
    form: str = "chunk"
    # null: the model's attention heads; else this many heads over the attention width (no GQA)
    n_heads: Optional[int] = None
    chunk_size: int = 64
    norm_eps: float = 1e-5

    def check(self, width: int) -> Problems:
        out: Problems = []
        if self.n_heads is not None and (self.n_heads < 1 or width % self.n_heads):
            out.append(("n_heads", f"{self.n_heads} heads do not divide the attention width {width}"))
        if self.form not in FORMS:
            out.append(("form", f"'{self.form}' is not one of {', '.join(FORMS)}"))
        out += at_least(self, ("chunk_size",))
        if self.norm_eps <= 0:
            out.append(("norm_eps", "must be > 0"))
        return out


@dataclass
class RetentionConfig(_LinearAttnConfig):
    """Multi-scale retention (RetNet). Heads and head_dim are the model's attention ones (n_heads,
    n_kv_heads, head_dim, rotary_pct, rope_theta), so a donor's Q/K/V/O fit (transfer attn-init),
    unless `n_heads` is set: then the attention width n_heads * head_dim is split into that many
    heads (no GQA), e.g. the paper's RetNet-410m, 4 heads of 256, beside Pythia's 16-head attention.

    Decay per head h of H: gamma_h = 1 - 2**(-decay_base - h * decay_span / max(H - 1, 1)) when
    decay_span is set, else torchscale's 1 - 2**(-decay_base - h)."""

    decay_base: float = 5.0
    decay_span: Optional[float] = None
    # swish output gate g_proj (D -> H*hd), as RetNet
    gate: bool = True

    def check(self, width: int) -> Problems:
        out = super().check(width)
        if self.decay_base <= 0 or (self.decay_span is not None and self.decay_span < 0):
            out.append(("decay_base", "need decay_base > 0 and decay_span >= 0 (gamma in (0, 1))"))
        return out


@dataclass
class GLAConfig(_LinearAttnConfig):
    """Gated linear attention (Yang et al. 2023; flash-linear-attention's GatedLinearAttention) on
    the model's attention heads (n_heads, n_kv_heads, head_dim), no positional encoding."""

    # the chunked form holds a (C, C, head_dim) decay tensor per chunk: keep C small
    chunk_size: int = 16
    # forget gate gk = logsigmoid(W2 W1 x + b) / gate_logit_normalizer, W1: (rank, D)
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0

    def check(self, width: int) -> Problems:
        out = super().check(width) + at_least(self, ("gate_low_rank_dim",))
        if self.gate_logit_normalizer <= 0:
            out.append(("gate_logit_normalizer", "must be > 0"))
        return out


# MLP kinds with a gate_proj: down(act(gate(x)) * up(x))
GATED_MLPS = ("swiglu", "geglu_tanh")


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling, computed exactly as transformers' rope init functions
    (modeling_rope_utils) compute it (models/rotary.py):

        none     plain RoPE
        linear   inv_freq / factor
        llama3   Llama-3.1: low frequencies / factor, high ones kept, a smooth ramp between
                 (factor, low_freq_factor, high_freq_factor, original_max_seq_len)
        yarn     YaRN: interpolation blended into extrapolation by a ramp over the rotary dims
                 (factor, beta_fast, beta_slow, original_max_seq_len, truncate), cos / sin times
                 attention_factor (null: 0.1 ln(factor) + 1, or from mscale / mscale_all_dim)
        factors  inv_freq / factors[i] per rotary pair: llama.cpp's rope_freqs tensor (a GGUF
                 Llama-3.x stores its llama3 scaling this way)

    Dynamic NTK and LongRoPE change the frequencies with the sequence length (and transformers'
    results with what ran before), so no donor using them is accepted."""

    type: Literal["none", "linear", "llama3", "yarn", "factors"] = "none"
    factor: float = 1.0
    # llama3 / yarn: the context length of pretraining before the extension (null: max_seq_len)
    original_max_seq_len: Optional[int] = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    factors: Optional[list[float]] = None

    def check(self, rot_dim: int) -> Problems:
        out: Problems = []
        if self.type == "none":
            return out
        if self.factor <= 0:
            out.append(("factor", f"must be > 0, got {self.factor}"))
        if self.original_max_seq_len is not None and self.original_max_seq_len < 1:
            out.append(("original_max_seq_len", "must be >= 1 (or null for max_seq_len)"))
        if self.type == "llama3" and self.high_freq_factor == self.low_freq_factor:
            out.append(("high_freq_factor", "must differ from low_freq_factor (the ramp divides by the gap)"))
        if self.type == "factors" and (self.factors is None or len(self.factors) != rot_dim // 2
                                       or any(f <= 0 for f in self.factors)):
            out.append(("factors", f"need {rot_dim // 2} positive factors (one per rotary pair), "
                                   f"got {None if self.factors is None else len(self.factors)}"))
        return out


@dataclass
class LocalAttentionConfig:
    """The sliding-window attention layers ('W' in the pattern): query t sees keys t - window + 1
    .. t (transformers' sliding_window), in training (a band mask) and in decoding (the KV cache
    keeps the last window - 1 positions only, so these layers decode in bounded memory)."""

    window: Optional[int] = None
    # null: the model's rope_theta / rope_scaling (Mistral, Gemma-2); Gemma-3's local layers
    # have their own base and no scaling
    rope_theta: Optional[float] = None
    rope_scaling: Optional[RopeScalingConfig] = None


@dataclass
class ModelConfig:
    """The XATL decoder: each layer is norm -> mixer -> residual, norm -> MLP -> residual."""

    vocab_size: int
    d_model: int
    n_layers: int
    # One symbol per layer (see models/pattern.py); '|' marks pipeline-stage boundaries.
    pattern: str
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    # 'gelu' (exact, Pythia), 'gelu_tanh' (GPT-2), 'relu', 'swiglu' (Llama: silu(gate) * up),
    # 'geglu_tanh' (Gemma: gelu_tanh(gate) * up), 'none' (no MLP: the original Mamba layout).
    mlp: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu_tanh", "none"] = "gelu"
    d_mlp: int = 0
    mlp_bias: bool = True
    # GPT-NeoX form: x + mixer(norm1(x)) + mlp(norm2(x)).
    parallel_residual: bool = False
    # Where the block's norms sit: 'pre' x + f(norm(x)) (norm1, norm2); 'post' x + norm(f(x))
    # (OLMo-2: post_norm1, post_norm2 only); 'sandwich' x + post_norm(f(norm(x))) (Gemma-2/3: all four).
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"
    # RMSNorm scales by (1 + weight) (Gemma's convention: the donor's weights copied as stored, 0 at init).
    norm_unit_offset: bool = False
    # Token embeddings times this (Gemma: sqrt(d_model), rounded to the weights' dtype as Gemma does).
    embed_scale: float = 1.0
    # A learned absolute position embedding pos_embed (max_seq_len, D) added to the token embedding (GPT-2).
    pos_embed: bool = False
    # logits = final_softcap * tanh(logit_scale * head(x) / final_softcap); null cap: no capping (Gemma-2).
    logit_scale: float = 1.0
    final_softcap: Optional[float] = None
    tie_embeddings: bool = False
    # Pad the embedding / head rows to a multiple of this (tensor parallelism, kernels).
    pad_vocab_multiple: int = 1
    # attention layers
    n_heads: int = 1
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rotary_pct: float = 1.0
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    qkv_bias: bool = False
    attn_out_bias: bool = False
    # 'head': each q / k head normalised over head_dim, one weight (head_dim,) for all heads (Qwen3,
    # Gemma-3); 'full': the whole q / k projection, weights (H*hd,) / (KV*hd,) (OLMo-2). The kind,
    # eps and unit offset are the block norms'.
    qk_norm: Literal["none", "head", "full"] = "none"
    # softmax scale of q.k; null: head_dim ** -0.5 (Gemma-2/3: query_pre_attn_scalar ** -0.5)
    attn_scale: Optional[float] = None
    # attention scores capped as attn_softcap * tanh(scores / attn_softcap) (Gemma-2); null: none
    attn_softcap: Optional[float] = None
    local_attention: LocalAttentionConfig = field(default_factory=LocalAttentionConfig)
    max_seq_len: int = 2048
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    gla: GLAConfig = field(default_factory=GLAConfig)
    init_std: float = 0.02

    # ---- derived values, one home each -------------------------------------------------
    @property
    def layer_symbols(self) -> list[str]:
        return parse_pattern(self.pattern).symbols

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def lin_attn_heads(self, n_heads: Optional[int]) -> tuple[int, int, int]:
        """(heads, KV heads, head_dim) of a retention / GLA mixer whose config sets `n_heads` (or None)."""
        if n_heads is None:
            return self.n_heads, self.kv_heads, self.attn_head_dim
        return n_heads, n_heads, self.n_heads * self.attn_head_dim // n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.attn_head_dim * self.rotary_pct)

    def rope_of(self, symbol: str) -> tuple[float, RopeScalingConfig]:
        """(theta, scaling) of the RoPE an attention layer ('*' or 'W') uses."""
        local = self.local_attention
        if symbol == "W":
            return (self.rope_theta if local.rope_theta is None else local.rope_theta,
                    self.rope_scaling if local.rope_scaling is None else local.rope_scaling)
        return self.rope_theta, self.rope_scaling

    def window_of(self, symbol: str) -> Optional[int]:
        """The sliding window of an attention layer ('W'), None for full attention ('*')."""
        return self.local_attention.window if symbol == "W" else None

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def check(self) -> Problems:
        out: Problems = []
        out += at_least(self, ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "pad_vocab_multiple"))
        if out:
            return out
        try:
            symbols = self.layer_symbols
        except ValueError as e:
            return [("pattern", str(e))]
        if len(symbols) != self.n_layers:
            out.append(("pattern", f"has {len(symbols)} layer symbols but n_layers is {self.n_layers}"))
        if self.head_dim is None and self.d_model % self.n_heads:
            out.append(("n_heads", f"{self.n_heads} heads do not divide d_model {self.d_model}"))
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            out.append(("n_kv_heads", f"{self.n_kv_heads} KV heads do not divide n_heads {self.n_heads}"))
        if not 0.0 <= self.rotary_pct <= 1.0:
            out.append(("rotary_pct", f"must be in [0, 1], got {self.rotary_pct}"))
        elif int(self.attn_head_dim * self.rotary_pct) % 2:
            out.append(("rotary_pct", f"rotary dims {int(self.attn_head_dim * self.rotary_pct)} must be even"))
        if self.mlp != "none" and self.d_mlp < 1:
            out.append(("d_mlp", f"must be >= 1 when mlp is '{self.mlp}'"))
        if self.norm_eps <= 0:
            out.append(("norm_eps", "must be > 0"))
        out += self._check_block_options(symbols)
        if "M" in symbols:
            out += [(f"mamba.{k}", r) for k, r in self.mamba.check(self.d_model)]
        if "S" in symbols:
            out += [(f"mamba2.{k}", r) for k, r in self.mamba2.check(self.d_model)]
        if "R" in symbols:
            out += [(f"retention.{k}", r) for k, r in self.retention.check(self.n_heads * self.attn_head_dim)]
            rhd = self.lin_attn_heads(self.retention.n_heads)[2]
            if not out and int(rhd * self.rotary_pct) % 2:
                out.append(("retention.n_heads",
                            f"rotary dims {int(rhd * self.rotary_pct)} of a retention head must be even"))
        if "G" in symbols:
            out += [(f"gla.{k}", r) for k, r in self.gla.check(self.n_heads * self.attn_head_dim)]
        return out

    def _check_block_options(self, symbols: list[str]) -> Problems:
        out: Problems = []
        if self.norm_placement != "pre" and self.parallel_residual:
            out.append(("norm_placement", f"'{self.norm_placement}' norms need the sequential block "
                                          "(parallel_residual false)"))
        if self.norm_unit_offset and self.norm != "rmsnorm":
            out.append(("norm_unit_offset", "the (1 + weight) convention is an RMSNorm one (norm 'rmsnorm')"))
        for key in ("embed_scale", "attn_scale", "attn_softcap", "final_softcap"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                out.append((key, f"must be > 0, got {v}"))
        if self.logit_scale == 0:
            out.append(("logit_scale", "must not be 0"))
        out += [(f"rope_scaling.{k}", r) for k, r in self.rope_scaling.check(self.rotary_dim)]
        local = self.local_attention
        if "W" in symbols:
            if local.window is None or local.window < 1:
                out.append(("local_attention.window", f"'W' layers need a window >= 1, got {local.window}"))
            if local.rope_scaling is not None:
                out += [(f"local_attention.rope_scaling.{k}", r) for k, r in local.rope_scaling.check(self.rotary_dim)]
        return out


@dataclass
class FreezeConfig:
    """When transferred weights train. `lit` is the paper's Loss Improvement Threshold."""

    policy: Literal["none", "fixed", "lit"] = "none"
    # 'fixed': unfreeze at this optimizer step.
    unfreeze_step: int = 0
    # 'lit': mean loss over `window` steps; relative improvement between consecutive windows
    # below `threshold` for `patience` windows in a row -> unfreeze.
    window: int = 100
    threshold: float = 0.01
    patience: int = 1
    # Newly unfrozen weights get their own linear LR warmup (a high LR on them blows up).
    warmup_steps: int = 100

    def check(self) -> Problems:
        out: Problems = []
        if self.window < 1:
            out.append(("window", "must be >= 1"))
        if self.patience < 1:
            out.append(("patience", "must be >= 1"))
        if self.threshold < 0:
            out.append(("threshold", "must be >= 0"))
        if self.unfreeze_step < 0 or self.warmup_steps < 0:
            out.append(("unfreeze_step", "steps must be >= 0"))
        return out


TRANSFER_MODES = ("emb+norm+mlp+oproj", "emb+norm+mlp", "emb+norm", "attn-init")


@dataclass
class TransferConfig:
    # A donor folder or a named asset (see megaxatl/assets.py); null trains from scratch.
    donor: Optional[str] = None
    mode: str = "emb+norm+mlp+oproj"
    # target layer i takes donor layer layer_map[i]; null -> evenly spaced, first and last kept.
    layer_map: Optional[list[int]] = None
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    # "auto:K" (keep K attention layers) or "auto:0.5" (a fraction of the layers): chosen from the
    # donor by their measured cost on `select_data` text (transfer/select.py); the pattern's other
    # layers take its one LCI symbol. Resolved at transfer time into model.pattern.
    keep_attention: Optional[str] = None
    select_data: Optional[str] = None
    select_tokens: int = 4096
    select_method: Literal["auto", "greedy", "exhaustive"] = "auto"

    def check(self) -> Problems:
        out: Problems = []
        if self.keep_attention is not None:
            if not self.keep_attention.startswith("auto:"):
                out.append(("keep_attention", f"expected 'auto:K' or 'auto:FRACTION', got {self.keep_attention!r}"))
            if not self.select_data:
                out.append(("select_data", "keep_attention needs calibration text (a .txt file or folder)"))
        if self.select_tokens < 2:
            out.append(("select_tokens", "must be >= 2"))
        if self.mode not in TRANSFER_MODES:
            out.append(("mode", f"'{self.mode}' is not one of {', '.join(TRANSFER_MODES)}"))
        if self.layer_map is not None and any(i < 0 for i in self.layer_map):
            out.append(("layer_map", "donor layer indices must be >= 0"))
        out += [(f"freeze.{k}", r) for k, r in self.freeze.check()]
        return out


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    # pipeline micro-batches per accumulation step: an optimizer step runs
    # train.grad_accum x micro_batches micro-batches of data.micro_batch_size per DP rank
    micro_batches: int = 1
    activation_checkpointing: bool = False
    cpu_offload: bool = False

    def check(self) -> Problems:
        out: Problems = []
        out += at_least(self, ("tp", "pp", "micro_batches"))
        if self.zero_stage not in (0, 1, 2, 3):
            out.append(("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"))
        if self.pp > 1 and self.zero_stage > 1:
            out.append(("zero_stage", "pipeline parallelism composes with ZeRO stage 0 or 1 only"))
        if self.sequence_parallel and self.tp == 1:
            out.append(("sequence_parallel", "needs tp > 1"))
        return out


@dataclass
class DataConfig:
    # Folder of webdataset shards with manifest.json (megaxatl prepare-data); or null. With
    # access "stream" also any URL webdataset opens: an http(s) prefix, or a URL with {name} where
    # the file name goes ("pipe:aws s3 cp s3://bucket/ds/{name} -"); see megaxatl/data/stream.py.
    train_shards: Optional[str] = None
    val_shards: Optional[str] = None
    # "random": local files, one pread per sample, a permutation over all samples per epoch.
    # "stream": shards read as sequential tar streams (object stores), shards permuted per epoch
    # and samples within each shard; both deterministic, DP-sharded, resumable; a run keeps one.
    access: Literal["random", "stream"] = "random"
    seq_len: int = 512
    micro_batch_size: int = 4
    num_workers: int = 0
    seed: int = 1234

    def check(self) -> Problems:
        out: Problems = []
        out += at_least(self, ("seq_len", "micro_batch_size"))
        if self.num_workers < 0:
            out.append(("num_workers", "must be >= 0"))
        if self.access not in ("random", "stream"):
            out.append(("access", f"must be 'random' or 'stream', got {self.access!r}"))
        for key in ("train_shards", "val_shards"):
            where = getattr(self, key)
            if self.access == "random" and where and (str(where).startswith("pipe:") or "://" in str(where)):
                out.append((key, f"{where} is a URL: random access reads local files; set data.access: stream"))
        return out


@dataclass
class DistillConfig:
    """Distillation from a teacher (train/distill.py): stage 1 aligns the replaced mixers' outputs
    for `align_steps` steps, stage 2 mixes forward KL on logits into the LM loss."""

    # null: off; "donor": transfer.donor; else a donor folder / named asset or a model folder
    teacher: Optional[str] = None
    # stage 2 loss: (1 - w) * CE + w * T^2 * KL; w goes linearly from weight to weight_end
    weight: float = 0.5
    weight_end: Optional[float] = None
    temperature: float = 1.0
    align_steps: int = 0
    # null: train.dtype
    teacher_dtype: Optional[Literal["fp32", "bf16"]] = None

    def check(self) -> Problems:
        out: Problems = []
        for k in ("weight", "weight_end"):
            v = getattr(self, k)
            if v is not None and not 0 <= v <= 1:
                out.append((k, f"must be in [0, 1], got {v}"))
        if self.temperature <= 0:
            out.append(("temperature", "must be > 0"))
        if self.align_steps < 0:
            out.append(("align_steps", "must be >= 0"))
        return out


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    dtype: Literal["fp32", "bf16"] = "bf16"
    seed: int = 1234
    # Embeddings are weight-decayed unless this is false (norms, biases, A_log, D never are).
    decay_embeddings: bool = False
    eval_interval: int = 100
    eval_steps: int = 10
    save_interval: int = 500
    keep_last: int = 3
    out_dir: str = "runs/default"
    # Initial weights: null (scratch, or the transfer section's donor) or a `megaxatl transfer` output.
    init_from: Optional[str] = None
    max_bad_steps: int = 5
    # 'adamw' (torch, the default: nothing to compile), or DeepSpeed's JIT-compiled
    # 'ds_cpu_adam' (ZeRO-Offload) / 'ds_fused_adam' (GPU).
    optimizer: Literal["adamw", "ds_cpu_adam", "ds_fused_adam"] = "adamw"
    # Continue from out_dir's latest complete checkpoint when there is one.
    resume: bool = True
    # Also save the AdamW moments layout-free in each checkpoint (optimizer/: 2 fp32 words per
    # parameter), so a resume at another TP / PP / DP layout keeps them; false saves that disk
    # and such a resume restarts the optimizer (weights are always layout-free).
    portable_optimizer: bool = True
    # Also write DeepSpeed's own per-rank checkpoint files (engine.save_checkpoint: what its tools
    # such as zero_to_fp32 read). false: only the layout-free weights/ + optimizer/, about half
    # the bytes and time; a resume, at the same layout or another, then reads those.
    save_deepspeed_state: bool = True
    distill: DistillConfig = field(default_factory=DistillConfig)

    def check(self) -> Problems:
        out: Problems = [(f"distill.{k}", r) for k, r in self.distill.check()]
        if self.steps < 1:
            out.append(("steps", "must be >= 1"))
        if not self.out_dir.strip():
            out.append(("out_dir", "must not be empty (the run's folder)"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            out.append(("lr", f"need lr > 0 and 0 <= min_lr <= lr, got {self.lr}, {self.min_lr}"))
        if self.warmup_steps < 0:
            out.append(("warmup_steps", "must be >= 0"))
        if not all(0 <= b < 1 for b in self.betas):
            out.append(("betas", f"each must be in [0, 1), got {list(self.betas)}"))
        out += at_least(self, ("grad_accum", "eval_interval", "eval_steps", "save_interval", "keep_last",
                               "max_bad_steps"))
        if self.grad_clip < 0:
            out.append(("grad_clip", "must be >= 0 (0 disables clipping)"))
        if not self.save_deepspeed_state and not self.portable_optimizer:
            out.append(("save_deepspeed_state", "false needs portable_optimizer true: otherwise no checkpoint "
                                                "would hold the optimizer state"))
        return out


@dataclass
class LoggingConfig:
    log_interval: int = 10
    # 'disabled', 'offline' (no network) or 'online'; the WANDB_MODE env var overrides.
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "megaxatl"
    run_name: Optional[str] = None
    progress: bool = True
    # Peak dense TFLOP/s per device for MFU; null -> MEGAXATL_PEAK_TFLOPS env, then a table of
    # known GPUs (train/metrics.py); on CPU without either, MFU is not reported.
    peak_tflops: Optional[float] = None

    def check(self) -> Problems:
        out: Problems = [("log_interval", "must be >= 1")] if self.log_interval < 1 else []
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            out.append(("peak_tflops", "must be > 0 (or null)"))
        return out


@dataclass
class Config:
    model: ModelConfig
    transfer: TransferConfig = field(default_factory=TransferConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    # Free text shown by `megaxatl info`.
    description: str = ""

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches per optimizer step on each DP rank (DeepSpeed's gradient_accumulation_steps;
        the pipeline's micro-batches with pp > 1)."""
        return self.train.grad_accum * self.parallel.micro_batches

    def tokens_per_step(self, dp: int) -> int:
        """Tokens one optimizer step trains on, over `dp` data-parallel replicas."""
        return self.data.micro_batch_size * self.data.seq_len * self.micro_batches_per_step * dp

    def check(self) -> Problems:
        out: Problems = []
        for section in ("model", "transfer", "parallel", "data", "train", "logging", "kernels"):
            out += [(f"{section}.{k}", r) for k, r in getattr(self, section).check()]
        m, p = self.model, self.parallel
        if self.transfer.keep_attention is not None and self.train.init_from:
            out.append(("transfer.keep_attention", "chooses the kept layers of a donor transfer; with "
                                                   "train.init_from the pattern is the init folder's"))
        if p.tp > 1 and not out:
            if m.padded_vocab_size % p.tp:
                out.append(("parallel.tp", f"padded vocab {m.padded_vocab_size} is not divisible by tp {p.tp}"))
            if any(s in ATTENTION_SYMBOLS for s in m.pattern) and (m.n_heads % p.tp or (m.kv_heads % p.tp and p.tp % m.kv_heads)):
                out.append(("parallel.tp", f"tp {p.tp} does not split {m.n_heads} heads / {m.kv_heads} KV heads"))
        d = self.train.distill
        if d.teacher is not None and d.align_steps and (p.tp > 1 or p.pp > 1):
            out.append(("train.distill.align_steps", "hidden-state alignment calls the mixers outside the engine: "
                                                     f"tp = 1, pp = 1 only (got tp {p.tp}, pp {p.pp})"))
        if d.teacher is not None and d.align_steps and p.zero_stage == 3:
            out.append(("train.distill.align_steps", "hidden-state alignment calls the mixers outside the engine: "
                                                     "ZeRO stage 3 is not supported"))
        if d.teacher == "donor" and not self.transfer.donor:
            out.append(("train.distill.teacher", "'donor' needs transfer.donor"))
        if p.pp > 1 and p.pp > m.n_layers:
            out.append(("parallel.pp", f"pp {p.pp} exceeds n_layers {m.n_layers}"))
        positional = m.pos_embed or any(s in ATTENTION_SYMBOLS for s in m.pattern)
        if self.data.train_shards is not None and positional and self.data.seq_len > m.max_seq_len and not out:
            # the donor never saw those positions (and a learned position embedding has no row for them)
            out.append(("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len {m.max_seq_len}, the "
                                        "positions the attention layers were trained for"))
        return out
