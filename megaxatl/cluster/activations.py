"""Saved activations of one XATL block for one micro-batch on one TP rank, per kernel backend.

Two columns, because the same model saves different tensors on different kernels:
    torch   this package's own kernels as dispatched on CPU (selective scan: the C++ `cpu`
            core; SSD, conv, GLA: the pure-PyTorch `torch` paths). Measured-calibrated:
            tests/test_plan_calibration.py counts what autograd saves (cluster/calibrate.py)
            for every mixer, fp32 and bf16, and holds these formulas within 10 %.
    cuda    mamba-ssm / causal-conv1d / flash-linear-attention on a GPU: our PyTorch glue (the
            same ops as on CPU) plus what those kernels' autograd Functions keep, counted from
            their ctx.save_for_backward (mamba-ssm SelectiveScanFn and MambaChunkScanCombinedFn,
            causal-conv1d CausalConv1dFn, fla ChunkGLAFunction / ChunkSimpleGLAFunction) after
            their own .contiguous() calls. Derived from the sources, not measured here (no GPU);
            for mamba_2.8b's block it gives 241.3 MiB where a saved-tensor count with mamba-ssm's
            kernels gave 241.8 (benchmarks/README.md).
Our Triton kernels (a GPU without mamba-ssm / fla) are not a column of their own.

Notation: s b tokens, h = d_model, a = bytes of the compute dtype (bf16 2, fp32 4), e = the SSM's
inner width, w = heads x head_dim, t = TP size (channel-split tensors / t, h-sized ones whole).
What costs more than the textbook count (why one fused-kernel formula was 1.2-5x low):
  - every norm computes in fp32: it keeps an fp32 copy of its input (4 s b h, whatever a is;
    in bf16 a parallel-residual block makes two: norm1 and norm2 each call x.float()), and its
    output is kept again by the projection that reads it (a s b h);
  - each `.float()` of a bf16 tensor is a new fp32 tensor (scan inputs, D skip, gates);
  - a transposed view fed to a Linear is made contiguous (Mamba's x_proj / out_proj inputs);
  - fp32 views keep their whole parent alive (z of Mamba's packed in_proj output).
"""

from __future__ import annotations

import math

from megaxatl.config.pattern import ATTENTION_SYMBOLS
from megaxatl.config.schema import GATED_MLPS

BACKENDS = ("cuda", "torch")
CALIBRATED = {"torch": "measured-calibrated (saved-tensor count, CPU)",
              "cuda": "from the kernels' save_for_backward (sources), not measured"}
CPU_LANES = 16  # the C++ selective scan pads N to a multiple of 16 (kernels/src/selective/cpu.py)


def dtype_bytes(dtype: str | int) -> int:
    if isinstance(dtype, int):
        return dtype
    return 2 if dtype == "bf16" else 4


def _norm_bytes(m, a: int, pre_norms: int, post_norms: int) -> float:
    """Per token: each norm's fp32 input copy (4 h) and statistics, plus its output when a
    projection reads it (pre-norms; a post-norm's output goes into the residual add)."""
    h = m.d_model
    if m.norm == "rmsnorm":
        # xf * rsqrt kept by the weight multiply: as the dtype cast (a) or, with the unit
        # offset, before the cast (fp32); the rsqrt (4 per row)
        extra = (4 * h if m.norm_unit_offset else a * h) + 4
    else:
        extra = 8  # LayerNorm's mean and rstd
    norms = pre_norms + post_norms
    inputs = norms
    if m.parallel_residual and pre_norms == 2 and a == 4:
        inputs -= 1  # norm1 and norm2 read the same x; only bf16's .float() makes two copies
    return inputs * 4 * h + norms * extra + pre_norms * a * h


def _mlp_bytes(m, a: int, tp: int) -> float:
    if m.mlp == "none":
        return 0.0
    f = m.d_mlp / tp
    # gated: gate output, act(gate), up output, product; gelu: fc1 output and gelu output;
    # relu keeps only its output (the backward reads the result)
    n = 4 if m.mlp in GATED_MLPS else (1 if m.mlp == "relu" else 2)
    return n * a * f


def _attention_bytes(m, symbol: str, a: int, b: int, s: int, tp: int, backend: str) -> float:
    """Flash / SDPA: q, k, v (after rotary), the output (the o_proj input), the fp32
    log-sum-exp per head and row, the rotary cos / sin tables (fp32, once per call)."""
    hq = m.n_heads * m.attn_head_dim / tp
    hkv = max(m.kv_heads / tp, 1) * m.attn_head_dim  # KV heads are copied when t > KV heads
    per_token = a * (2 * hq + 2 * hkv) + 4 * m.n_heads / tp
    out = s * b * per_token + 2 * 4 * s * m.rotary_dim
    window = m.window_of(symbol)
    if window is not None and s > window:
        # the band mask, kept by SDPA: as an additive bias in the compute dtype on CPU, as bool by the
        # memory-efficient CUDA kernel
        out += (a if backend == "torch" else 1) * s * s
    return out


def _channel_last_ok(channels: float, row_stride: float) -> bool:
    """Whether causal-conv1d takes a (B, channels, L) view with unit channel stride and this
    time stride as it is (channel-last: both multiples of 8), or copies it."""
    return channels % 8 == 0 and row_stride % 8 == 0


def _mamba_bytes(m, a: int, b: int, s: int, tp: int, backend: str) -> float:
    e = int(m.mamba.expand * m.d_model) / tp
    n, k = m.mamba.d_state, m.mamba.d_conv
    r = m.mamba.dt_rank or math.ceil(m.d_model / 16)
    dbc = a * (r + 2 * n)  # x_proj output (dt_proj reads a view of it)
    if backend == "cuda":
        # causal_conv1d_fn keeps its input: a channel-last view of the packed in_proj output
        # (2e) when causal-conv1d takes that layout (channels and strides multiples of 8,
        # kernels/src/conv1d/cuda.py), else a contiguous copy (e); the conv output, and one
        # contiguous copy of it, for x_proj (a transposed input) or for SelectiveScanFn (u),
        # whichever layout it has; the scan makes delta, B, C, z contiguous and keeps them with
        # u, its output before the gate and fp32 chunk states every 2048 steps; out_proj's
        # transposed input is copied
        conv_in = 2 * a * e if _channel_last_ok(e, 2 * e) else a * e
        per_token = conv_in + 2 * a * e + 3 * a * e + 2 * a * n + a * e + dbc
        return s * b * per_token + 4.0 * b * e * math.ceil(s / 2048) * 2 * n
    # C++ scan: the conv's zero-padded fp32 input (s + k - 1), its output (silu input), the
    # scan's fp32 u and softplus(dt), softplus' input, B and C padded to 16 lanes; the D skip's
    # u and the gate's z in fp32 (bf16: new copies; fp32: z keeps the packed in_proj output,
    # 2e), the gate's two factors; x_proj / out_proj inputs made contiguous (a each)
    npad = -(-n // CPU_LANES) * CPU_LANES
    per_token = 9 * 4 * e + 2 * a * e + 2 * 4 * npad + dbc
    return s * b * per_token + 4.0 * b * e * (k - 1)


def _mamba2_bytes(m, a: int, b: int, s: int, tp: int, backend: str) -> float:
    c2 = m.mamba2
    e = int(c2.expand * m.d_model) / tp
    heads = int(c2.expand * m.d_model) // c2.head_dim / tp
    g = max(c2.n_groups / tp, 1)  # a rank's heads need their group's B, C (copied when t > groups)
    n, k, t_chunk = c2.d_state, c2.d_conv, c2.chunk_size
    conv = e + 2 * g * n
    packed = a * (e + conv + heads)  # in_proj output: z, xBC, dt
    chunks = math.ceil(s / t_chunk)
    sp = chunks * t_chunk  # padded to whole chunks
    # gated RMSNorm (PyTorch in both columns): y and silu(z) in fp32, their product and its
    # normalised form, z.float() (fp32: a view of the packed output), the out_proj input
    gate = 4 * 4 * e + (4 * e if a == 2 else packed) + a * e
    if backend == "cuda":
        # the scan keeps dt, a view of the packed storage; causal_conv1d_fn keeps its input, a
        # view of that storage too when it takes the channel-last layout, else a contiguous
        # copy; the scan reads x, B, C as views of the conv output (or copies B and C, channel-
        # first) and keeps them, its output, and the fp32 dA cumsum per head and (padded) step
        conv_copy = 0 if _channel_last_ok(conv, e + conv + heads) else a * conv
        return s * b * (packed + conv_copy + a * conv + a * e + gate) + 4.0 * b * heads * sp
    # chunked SSD (autograd through PyTorch): x * dt, its two permuted copies and the
    # state-input contribution (4e each, padded length); the D skip's x (fp32: the conv output
    # storage; bf16: a copy, and another for the core); conv: padded fp32 input, fp32 output
    # (silu input); the decay, C B^T and their product per head and chunk pair (T x T); B and C
    # reshaped for two einsums each; chunk states (entering and with the initial one)
    skip = a * conv if a == 4 else 2 * 4 * e
    per_token = gate + skip + 2 * 4 * conv
    per_padded = 4 * 4 * e + 2 * 4 * heads * t_chunk + 4 * g * t_chunk + 4 * 4 * g * n
    states = 4.0 * b * heads * c2.head_dim * n * (2 * chunks + 1)
    return s * b * per_token + 4.0 * b * conv * (k - 1) + sp * b * per_padded + states


def _linear_attn_bytes(m, symbol: str, a: int, b: int, s: int, tp: int, backend: str) -> float:
    sub = m.retention if symbol == "R" else m.gla
    heads, kv, hd = m.lin_attn_heads(sub.n_heads)
    heads, kv = heads / tp, max(kv / tp, 1)
    w, wkv = heads * hd, kv * hd
    chunks = math.ceil(s / sub.chunk_size)
    c = sub.chunk_size
    if symbol == "R":
        # output: LayerNorm per head over an fp32 copy, the gate's fp32 silu input and both gate
        # factors, the out_proj input; rotary cos / sin
        glue = 4 * 4 * w + a * w
        rotary = 2 * 4 * s * m.rotary_dim
        if backend == "cuda":  # chunk_simple_gla keeps q, k (rotated), v
            return s * b * (glue + a * (w + 2 * wkv)) + rotary
        # chunked form: six (chunk, head_dim) operands of its matmuls, scores and decay
        # (chunk x chunk), the per-chunk entering states
        return (s * b * (glue + 6 * 4 * w + 2 * 4 * heads * c) + rotary
                + 4.0 * b * heads * chunks * hd * hd)
    # GLA: the forget gate's logsigmoid (input and buffer, fp32), its low-rank input; the
    # output RMSNorm (o, o * rsqrt, the weighted form) and gate (fp32 silu input and output)
    glue = 2 * 4 * wkv + a * sub.gate_low_rank_dim + 5 * 4 * w + a * w
    if backend == "cuda":
        # chunk_gla keeps q, k, v, the fp32 gate cumsum and the intra-chunk attention A
        # (fp32, chunk 64 for sequences of 64 and more)
        bt = min(64, max(16, 1 << max(s - 1, 0).bit_length()))
        return s * b * (glue + a * (w + 2 * wkv) + 4 * w + 4 * heads * bt)
    # chunked form: eight (chunk, head_dim) operands, q k products and the (chunk, chunk, K)
    # decay (both kept by the contraction), scores, entering states and every state the
    # recurrence multiplies by its (learned) decay
    return (s * b * (glue + 8 * 4 * w + 2 * 4 * heads * c * hd + 4 * heads * c)
            + 4.0 * b * heads * hd * hd * (2 * chunks - 1))


def block_activation_bytes(model_cfg, symbol: str, b: int, s: int, dtype: str | int, tp: int = 1,
                           backend: str = "cuda") -> float:
    """Bytes one block keeps for backward for a (b, s) micro-batch on one TP rank."""
    if backend not in BACKENDS:
        raise ValueError(f"activation backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    m, a = model_cfg, dtype_bytes(dtype)
    pre = m.norm_placement in ("pre", "sandwich")
    post = m.norm_placement in ("post", "sandwich")
    has_mlp = m.mlp != "none"
    pre_norms, post_norms = pre * (1 + has_mlp), post * (1 + has_mlp)
    per_token = _norm_bytes(m, a, pre_norms, post_norms) + _mlp_bytes(m, a, tp)
    if not pre:  # the mixer's and MLP's projections keep their inputs themselves
        per_token += a * m.d_model * (1 + has_mlp)
    out = s * b * per_token
    if symbol in ATTENTION_SYMBOLS:
        out += _attention_bytes(m, symbol, a, b, s, tp, backend)
    elif symbol == "M":
        out += _mamba_bytes(m, a, b, s, tp, backend)
    elif symbol == "S":
        out += _mamba2_bytes(m, a, b, s, tp, backend)
    elif symbol in ("R", "G"):
        out += _linear_attn_bytes(m, symbol, a, b, s, tp, backend)
    else:
        raise ValueError(f"no activation formula for pattern symbol {symbol!r}")
    return out
