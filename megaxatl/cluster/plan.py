"""`megaxatl plan`: per-GPU memory and step time of every TP x PP x DP x ZeRO layout that fits.

    megaxatl plan --config C --gpus N --gpu-mem GB [--seq-len L --micro-batch B] [--mfu 0.4 --peak-tflops T]

Prints the fitting layouts as a table (exit 0), or the smallest layout when nothing fits (exit 1,
NO_RESULT in megaxatl/exitcodes.py); bad input is one line on stderr (exit 2).

Notation: per rank, Ψ = parameters this rank's model copy holds, d = DP size, t = TP, p = PP,
b = micro-batch, s = sequence length, h = d_model, a = bytes of the compute dtype (2 bf16, 4 fp32).

Parameters per rank (Ψ). The model is built on the meta device and every tensor is assigned to a
pipeline stage (embedding: first stage; final norm and LM head: last; a tied head is held by
both ends when p > 1; block i: stage i // (n_layers / p)) and split by TP: vocab-parallel
embedding / head, column/row-parallel projections, per-channel conv / A_log / D / dt of the SSM
mixers all / t; block norms and row-parallel output biases replicated; K/V projections / min(t,
KV heads) (replicated KV heads when t > KV heads). Ψ is the most loaded stage's.

Model states (the ZeRO paper's accounting, arXiv 1910.02054; within 3 % of what DeepSpeed 0.19
holds on 2 CPU ranks with torch AdamW for fp32 ZeRO 0 / 2 and bf16 ZeRO 2), bytes per rank:
    W = a Ψ (compute weights)       G = a Ψ (gradients)
    M = 4 Ψ fp32 master copy: bf16 always; fp32 only under ZeRO >= 1 (DeepSpeed keeps its flat fp32
        partition apart from the module's weights: measured)
    O = 8 Ψ Adam moments (exp_avg, exp_avg_sq, fp32)
    ZeRO 0: W + G + M + O      1: W + G + (M + O)/d      2: W + (G + M + O)/d      3: (W + G + M + O)/d
  -> bf16: 16Ψ / 4Ψ + 12Ψ/d / 2Ψ + 14Ψ/d / 16Ψ/d;  fp32: 16Ψ / 8Ψ + 12Ψ/d / 4Ψ + 16Ψ/d / 20Ψ/d.
Buffers: ZeRO >= 1 adds DeepSpeed's reduce + all-gather buckets (2 x 5e7 elements x a, as
train/engine.py configures them); every rank adds `--overhead-gb` (CUDA context, NCCL, allocator
fragmentation; default 2).

Activations per block and micro-batch: cluster/activations.py, in two columns by kernel backend
(`--kernels`): `cuda` (mamba-ssm / causal-conv1d / fla, the default for a GPU plan: counted from
those kernels' save_for_backward, not measured) and `torch` (this package's own kernels as they
run on CPU: measured-calibrated, tests/test_plan_calibration.py holds the formulas within 10 % of
a saved-tensor count for every mixer in fp32 and bf16). Both count the fp32 copies the norms,
scans and gates make and the transposes made contiguous. Sequence parallelism is not modelled
(h-sized tensors are not split by t). LM head / loss (last stage): s b V/t x (a + 8): logits,
their fp32 copy and its gradient (assumed).
With activation checkpointing (one checkpoint per block): s b h x a per layer kept, plus one
layer's full activations while it is recomputed. Pipeline (1F1B): the first stage holds
min(p, m) micro-batches in flight (m micro-batches per step), i.e. the equivalent of all layers.

Recurrent state for generation, per sequence: Mamba-1 e N x 4 (fp32) + e (d_conv - 1) x a per
layer; Mamba-2 e N x 4 + (e + 2 g N)(d_conv - 1) x a; attention a KV cache 2 s h_kv x a.

Step time: FLOPs per token from train/metrics.flops_per_token (6 x matmul parameters + causal
attention 12 l H d s / 2 + selective scan 27 e N per SSM layer), x 4/3 with activation
checkpointing (a second forward). Global batch fixed across layouts: B x grad_accum x N sequences
(the config's batch with all N GPUs data parallel; fewer DP ranks take more micro-batches).
    time = FLOPs per token x tokens per step / (N x peak x MFU) / (1 - bubble)
    bubble = (p - 1) / (m + p - 1)  (1F1B), m = micro-batches per step per DP rank
  + TP all-reduce, PP send / receive and DP gradient reduction time from the stated link
    bandwidths (--intra-gbs, --inter-gbs; cluster/comm_model.py), not overlapped with compute.
Measured: the model-state formulas (against DeepSpeed, above) and the `torch` activation column.
Assumed: MFU, peak, bandwidths, the `cuda` activation column (from the kernels' sources) and the
LM head's activations. Layouts
are sorted by step time; equal times by smaller TP, then PP, then ZeRO stage (less communication),
then memory.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from megaxatl.cluster.activations import BACKENDS, CALIBRATED, block_activation_bytes, dtype_bytes
from megaxatl.cluster.layout import valid_pp, valid_tp
from megaxatl.config.pattern import ATTENTION_SYMBOLS

GiB = 1024**3
BUCKET = int(5e7)  # elements, train/engine.py's reduce_bucket_size and allgather_bucket_size
REPLICATED = ("norm1.", "norm2.", "norm_f.", "o_proj.bias", "out_proj.bias", "down_proj.bias", "q_norm.", "k_norm.",
              "pos_embed.")


@dataclass(frozen=True)
class Row:
    tp: int
    pp: int
    dp: int
    zero: int
    ckpt: bool
    params: int  # Ψ, this rank
    weights: float  # bytes
    grads: float
    optim: float
    acts: float
    buffers: float
    step_s: float
    tokens_per_s: float
    comm_s: float = 0.0  # of step_s: TP + PP + DP communication (cluster/comm_model.py)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optim + self.acts + self.buffers


def storage_bytes(tensors, seen: set) -> int:
    """Measured bytes of `tensors` (the planner's counterpart, read by its test and the parallel
    memory benchmark): each distinct storage once across calls sharing `seen`; meta tensors and
    non-tensors count nothing."""
    import torch

    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if st.nbytes() and key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def param_table(model_cfg) -> list[tuple[str, int]]:
    """(name, numel) of every parameter, from the model built on the meta device."""
    import torch

    from megaxatl.models import build

    with torch.device("meta"):
        model = build(model_cfg)
    return [(name, p.numel()) for name, p in model.named_parameters()]


def rank_params(model_cfg, tp: int, pp: int, table: list[tuple[str, int]] | None = None) -> int:
    """Ψ: parameters on the most loaded (stage, TP rank)."""
    table = table if table is not None else param_table(model_cfg)
    per_stage = model_cfg.n_layers // pp
    stage = [0.0] * pp
    kv = model_cfg.kv_heads
    tied = not any(name.startswith("lm_head.") for name, _ in table)
    for name, n in table:
        if any(r in name for r in REPLICATED):
            div = 1
        elif name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            div = min(tp, kv)
        else:
            div = tp
        share = n / div
        if name.startswith("layers."):
            stage[int(name.split(".")[1]) // per_stage] += share
        elif name.startswith("embed."):
            stage[0] += share
            if tied and pp > 1:  # tied: the last stage holds the head copy
                stage[-1] += share
        else:  # norm_f, lm_head
            stage[-1] += share
    return int(max(stage))


def layer_activation_bytes(model_cfg, symbol: str, b: int, s: int, a: int, tp: int, backend: str = "cuda") -> float:
    """Saved activations of one block for one micro-batch on one TP rank (cluster/activations.py)."""
    return block_activation_bytes(model_cfg, symbol, b, s, a, tp, backend)


def _linear_attn_dims(m, symbol: str) -> tuple[int, int, int, int]:
    """Retention ('R') / GLA ('G') -> (width, heads, head_dim, chunk size)."""
    sub = m.retention if symbol == "R" else m.gla
    w = m.n_heads * m.attn_head_dim
    heads = sub.n_heads or m.n_heads
    return w, heads, w // heads, sub.chunk_size


def decode_state_bytes(model_cfg, a: int, context: int) -> float:
    """Recurrent state of one sequence for generation (Mamba: constant; attention: KV cache)."""
    m, h, out = model_cfg, model_cfg.d_model, 0.0
    for sym in m.layer_symbols:
        if sym == "M":
            e = int(m.mamba.expand * h)
            out += e * m.mamba.d_state * 4 + e * (m.mamba.d_conv - 1) * a
        elif sym == "S":
            e = int(m.mamba2.expand * h)
            conv = e + 2 * m.mamba2.n_groups * m.mamba2.d_state
            out += e * m.mamba2.d_state * 4 + conv * (m.mamba2.d_conv - 1) * a
        elif sym in ATTENTION_SYMBOLS:  # a sliding window keeps window - 1 positions
            kept = context if sym == "*" else min(context, m.local_attention.window - 1)
            out += 2 * kept * m.kv_heads * m.attn_head_dim * a
        elif sym in ("R", "G"):
            w, _, hd, _ = _linear_attn_dims(m, sym)
            out += w * hd * 4
    return out


def model_state_bytes(psi: float, dtype: str, zero: int, dp: int) -> tuple[float, float, float]:
    """-> (weights, gradients, optimizer state) bytes per rank for Ψ parameters."""
    a = dtype_bytes(dtype)
    w, g = a * psi, a * psi
    master = 4.0 * psi if (dtype == "bf16" or zero >= 1) else 0.0
    o = 8.0 * psi + master
    if zero >= 1:
        o /= dp
    if zero >= 2:
        g /= dp
    if zero >= 3:
        w /= dp
    return w, g, o


def activation_bytes(cfg, tp: int, pp: int, b: int, s: int, ckpt: bool, micro_batches: int,
                     backend: str = "cuda") -> float:
    m = cfg.model
    a = dtype_bytes(cfg.train.dtype)
    symbols = m.layer_symbols
    per_stage = m.n_layers // pp
    in_flight = min(pp, micro_batches)
    worst = 0.0
    for st in range(pp):
        layers = [layer_activation_bytes(m, sym, b, s, a, tp, backend) for sym in symbols[st * per_stage:(st + 1) * per_stage]]
        if ckpt:
            stage = len(layers) * s * b * m.d_model * a * min(in_flight, pp - st) + max(layers)
        else:
            stage = sum(layers) * min(in_flight, pp - st)
        if st == pp - 1:
            stage += s * b * m.padded_vocab_size / tp * (a + 8)
        if st == 0:
            stage += s * b * m.d_model * a  # embedding output
        worst = max(worst, stage)
    return worst


def plan(cfg, gpus: int, gpu_mem_gb: float, seq_len: int | None = None, micro_batch: int | None = None,
         mfu: float = 0.4, peak_tflops: float = 989.0, overhead_gb: float = 2.0,
         zero_stages: tuple[int, ...] = (0, 1, 2, 3), gpus_per_node: int = 8,
         intra_gbs: float | None = None, inter_gbs: float | None = None,
         kernels: str = "cuda") -> tuple[list[Row], list[Row]]:
    """-> (layouts that fit, sorted by step time then memory; all layouts considered).
    intra_gbs / inter_gbs: link bandwidths, GB/s per GPU (default NVLink 4 / InfiniBand NDR);
    kernels: the activation column, 'cuda' or 'torch' (cluster/activations.py)."""
    from megaxatl.cluster import comm_model as cm
    from megaxatl.train.metrics import flops_per_token

    links = cm.Links(intra_gbs or cm.NVLINK_GBS, inter_gbs or cm.IB_GBS, gpus_per_node)

    s = seq_len or cfg.data.seq_len
    b = micro_batch or cfg.data.micro_batch_size
    cfg = replace(cfg, data=replace(cfg.data, seq_len=s, micro_batch_size=b))
    a = dtype_bytes(cfg.train.dtype)
    global_seqs = b * cfg.train.grad_accum * gpus
    fpt = flops_per_token(cfg)
    table = param_table(cfg.model)
    rows: list[Row] = []
    node = min(gpus, gpus_per_node)
    for tp in valid_tp(cfg.model, node):
        if node % tp:
            continue
        for pp in valid_pp(cfg.model, gpus // tp):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            if global_seqs % (b * dp):
                continue
            m = global_seqs // (b * dp)  # micro-batches per step per DP rank
            psi = rank_params(cfg.model, tp, pp, table)
            bubble = (pp - 1) / (m + pp - 1)
            for zero in zero_stages:
                if pp > 1 and zero > 1:
                    continue  # DeepSpeed's pipeline engine composes with ZeRO 0/1 only
                w, g, o = model_state_bytes(psi, cfg.train.dtype, zero, dp)
                buffers = overhead_gb * GiB + (2 * BUCKET * a if zero >= 1 else 0)
                comm = (cm.tp_seconds(cfg.model, tp, b, s, a, m, -(-cfg.model.n_layers // pp), links)
                        + cm.pp_seconds(cfg.model, tp, pp, b, s, a, m, links)
                        + cm.dp_seconds(psi, dp, zero, a, gpus, links))
                for ckpt in (False, True):
                    acts = activation_bytes(cfg, tp, pp, b, s, ckpt, m, kernels)
                    flops = fpt * (4 / 3 if ckpt else 1) * global_seqs * s
                    step = flops / (gpus * peak_tflops * 1e12 * mfu) / (1 - bubble) + comm
                    rows.append(Row(tp, pp, dp, zero, ckpt, psi, w, g, o, acts, buffers, step,
                                    global_seqs * s / step, comm))
    fits = sorted((r for r in rows if r.total <= gpu_mem_gb * GiB), key=_rank)
    return fits, rows


def _rank(r: Row) -> tuple:
    # Equal estimated times: prefer less TP / PP communication, then less ZeRO traffic, then memory.
    return (round(r.step_s, 9), r.tp, r.pp, r.zero, r.total)


# ------------------------------------------------------------------------------------------ CLI
def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="JSON config (model, data, train sections are used)")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpu-mem", type=float, required=True, metavar="GB", help="memory per GPU, GiB")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's data.seq_len")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the config's data.micro_batch_size")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays inside a node (default 8)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak per GPU, TFLOP/s (default 989: H100/H200 SXM)")
    p.add_argument("--intra-gbs", type=float, default=None,
                   help="intra-node link, GB/s per GPU (default 450: NVLink 4); TP, and PP / DP inside a node")
    p.add_argument("--inter-gbs", type=float, default=None,
                   help="inter-node link, GB/s per GPU (default 50: InfiniBand NDR 400 Gb/s)")
    p.add_argument("--kernels", choices=BACKENDS, default="cuda",
                   help="activation column: 'cuda' (mamba-ssm / causal-conv1d / fla, from their sources; default) "
                        "or 'torch' (this package's kernels, measured on CPU)")
    p.add_argument("--overhead-gb", type=float, default=2.0, help="per-GPU overhead: context, NCCL, fragmentation")
    p.add_argument("--zero", type=int, action="append", choices=(0, 1, 2, 3), default=None,
                   help="only these ZeRO stages (repeatable; default all)")
    p.add_argument("--top", type=int, default=15, help="rows to print (default 15)")


def run_plan(args) -> int:
    from megaxatl.cli import CLIError
    from megaxatl.config import ConfigError, load_config
    from megaxatl.models import count_parameters

    for k in ("gpus", "gpu_mem", "mfu", "peak_tflops", "intra_gbs", "inter_gbs"):
        if getattr(args, k, None) is not None and getattr(args, k) <= 0:
            raise CLIError(f"--{k.replace('_', '-')} must be > 0")
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise CLIError(str(e)) from None
    fits, rows = plan(cfg, args.gpus, args.gpu_mem, args.seq_len, args.micro_batch, args.mfu, args.peak_tflops,
                      args.overhead_gb, tuple(args.zero or (0, 1, 2, 3)), args.gpus_per_node,
                      args.intra_gbs, args.inter_gbs, args.kernels)
    s = args.seq_len or cfg.data.seq_len
    b = args.micro_batch or cfg.data.micro_batch_size
    a = dtype_bytes(cfg.train.dtype)
    print(f"{args.config}: {count_parameters(cfg.model) / 1e6:.1f}M parameters, {cfg.train.dtype}, "
          f"seq {s} x micro-batch {b}, global batch {b * cfg.train.grad_accum * args.gpus} sequences; "
          f"{args.gpus} GPUs x {args.gpu_mem:g} GiB; MFU {args.mfu:g} of {args.peak_tflops:g} TFLOP/s")
    from megaxatl.cluster.comm_model import IB_GBS, NVLINK_GBS

    print(f"assumed: MFU, peak, links {args.intra_gbs or NVLINK_GBS:g} GB/s in a node, "
          f"{args.inter_gbs or IB_GBS:g} GB/s between nodes (no overlap); measured: model-state bytes")
    print(f"activations: '{args.kernels}' kernels, {CALIBRATED[args.kernels]}; LM head's assumed")
    print(f"decode state per sequence: {decode_state_bytes(cfg.model, a, s) / 2**20:.2f} MiB at context {s}")
    if not rows:
        raise CLIError(f"no TP x PP x DP layout of {args.gpus} GPUs suits this model (see megaxatl.cluster.layout)")
    head = (f"{'TP':>3} {'PP':>3} {'DP':>4} {'ZeRO':>4} {'ckpt':>4} {'params/rank':>11} {'weights':>8} {'grads':>8} "
            f"{'optim':>8} {'acts':>8} {'other':>7} {'total GiB':>9} {'step s':>8} {'comm s':>7} {'tok/s':>10}")

    def line(r: Row) -> str:
        gb = [x / GiB for x in (r.weights, r.grads, r.optim, r.acts, r.buffers, r.total)]
        return (f"{r.tp:>3} {r.pp:>3} {r.dp:>4} {r.zero:>4} {'yes' if r.ckpt else 'no':>4} {r.params / 1e6:>10.1f}M "
                f"{gb[0]:>8.2f} {gb[1]:>8.2f} {gb[2]:>8.2f} {gb[3]:>8.2f} {gb[4]:>7.2f} {gb[5]:>9.2f} "
                f"{r.step_s:>8.3f} {r.comm_s:>7.3f} {r.tokens_per_s:>10.0f}")

    if not fits:
        best = min(rows, key=lambda r: r.total)
        print(f"nothing fits in {args.gpu_mem:g} GiB; the smallest layout needs {best.total / GiB:.1f} GiB:")
        print(head)
        print(line(best))
        from megaxatl.exitcodes import NO_RESULT

        return NO_RESULT
    print(f"{len(fits)} of {len(rows)} layouts fit; fastest first:")
    print(head)
    for r in fits[: args.top]:
        print(line(r))
    return 0
