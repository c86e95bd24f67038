"""Training metrics: a JSONL file, a live progress line, wandb, throughput and MFU.

Only rank 0 writes. Records in `<out_dir>/metrics.jsonl`, one JSON object per line with a `kind`:

    train   step, loss, lr, lr_transferred, grad_norm, tokens, tokens_per_s, tflops, mfu, eta_s, ...
    eval    step, val_loss, val_ppl, val_bpb, val_tokens
    event   step, event (start, resume, unfreeze, skip, checkpoint, stop, diverged, done), details

wandb: the mode comes from WANDB_MODE when set, else `logging.wandb_mode`; 'disabled' never
imports wandb and 'offline' never touches the network (runs sync later with `wandb sync`).

FLOPs per token (forward + backward = 3 x forward, so 6 FLOPs per matmul weight):
    6 * N_matmul                      N_matmul = parameters used in matmuls (all but the
                                      embedding lookup; the LM head counts, tied or not)
  + 12 * n_attn_layers * H * d_head * seq_len / 2   causal attention scores and values
                                      (PaLM's 12*l*H*Q*T, halved for the causal mask)
  + 27 * n_ssm_layers * d_inner * d_state           the selective scan: ~9 FLOPs per state
                                      element forward (mamba-ssm's estimate), x3 with backward
MFU = achieved FLOP/s per device / peak FLOP/s per device. Peak comes from `logging.peak_tflops`,
else MEGAXATL_PEAK_TFLOPS, else a table of dense bf16 peaks of known GPUs; a CPU has no entry
(set MEGAXATL_PEAK_TFLOPS to your machine's measured peak to get an MFU there), and then only the
achieved TFLOP/s is reported.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from megaxatl.config.pattern import ATTENTION_SYMBOLS
from megaxatl.config.schema import Config

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s per device, from vendor datasheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "A10": 125.0, "L4": 121.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "MI300X": 1307.0, "MI250X": 383.0,
}


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (see the module docstring); no allocation (meta device)."""
    from megaxatl.models import build

    m = cfg.model
    with torch.device("meta"):
        model = build(m)
    n = sum(p.numel() for p in model.parameters())
    n_matmul = n - model.embed.weight.numel()
    if model.lm_head is None:  # tied: the head matmul still happens
        n_matmul += model.embed.weight.numel()
    symbols = m.layer_symbols
    n_attn = sum(s in ATTENTION_SYMBOLS for s in symbols)  # a window's mask still forms every score
    flops = 6.0 * n_matmul
    flops += 12.0 * n_attn * m.n_heads * m.attn_head_dim * cfg.data.seq_len / 2
    flops += 27.0 * symbols.count("M") * int(m.mamba.expand * m.d_model) * m.mamba.d_state
    flops += 27.0 * symbols.count("S") * int(m.mamba2.expand * m.d_model) * m.mamba2.d_state
    return flops


def peak_tflops(cfg: Config) -> float | None:
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops
    env = os.environ.get("MEGAXATL_PEAK_TFLOPS")
    if env:
        return float(env)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # most specific first
            if key in name:
                return PEAK_BF16_TFLOPS[key]
    return None


def wandb_mode(cfg: Config) -> str:
    return os.environ.get("WANDB_MODE") or cfg.logging.wandb_mode


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _parse(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


class Metrics:
    """Rank-0 sink for training records. Other ranks get a no-op object (`enabled` False)."""

    def __init__(self, cfg: Config, out_dir: Path, rank: int, world_size: int, resume_step: int = 0,
                 dp: int | None = None):
        # world: every device (for per-device FLOP/s); dp: the data-parallel replicas (for tokens)
        self.cfg, self.enabled, self.world, self.dp = cfg, rank == 0, world_size, dp or world_size
        self.flops_per_token = flops_per_token(cfg)
        self.peak = peak_tflops(cfg)
        self.path = Path(out_dir) / "metrics.jsonl"
        self._wandb = None
        self._rates: list[float] = []
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():
            # Drop records past the checkpoint we resume from: those steps are about to be redone.
            # A process killed mid-write (kill -9, a node lost) can leave a torn last line: drop it.
            keep = [line for line in self.path.read_text().splitlines()
                    if (rec := _parse(line)) is not None and rec.get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self._file = open(self.path, "a", buffering=1)
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            from megaxatl.config import config_to_dict

            run_id_file = Path(out_dir) / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
            self._wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.run_name,
                                     dir=str(out_dir), mode=mode, config=config_to_dict(cfg),
                                     id=run_id, resume="allow")
            run_id_file.write_text(self._wandb.id)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None and record["kind"] in ("train", "eval"):
            data = {f"{record['kind']}/{k}": v for k, v in record.items()
                    if k not in ("kind", "step", "time") and isinstance(v, (int, float))}
            self._wandb.log(data, step=record["step"])

    def event(self, step: int, event: str, **details) -> None:
        self.write({"kind": "event", "step": step, "event": event, **details})
        if self.enabled and self.cfg.logging.progress and event not in ("skip",):
            extra = " ".join(f"{k}={v}" for k, v in details.items() if not isinstance(v, (dict, list)))
            print(f"[megaxatl] step {step}: {event} {extra}".rstrip(), file=sys.stderr, flush=True)
            if "kernels" in details:  # what runs each scan / conv op (preflight.check_kernels)
                print("[megaxatl] kernels: " + " ".join(f"{op}={b}" for op, b in details["kernels"].items()),
                      file=sys.stderr, flush=True)

    def train(self, step: int, total_steps: int, tokens: int, seconds: float, **values) -> None:
        """Log a training record; `tokens` processed (all ranks) in `seconds` of step time since
        the previous record (eval and checkpoint pauses excluded by the caller)."""
        tokens_per_s = tokens / max(seconds, 1e-9)
        self._rates.append(tokens_per_s)
        tflops = tokens_per_s * self.flops_per_token / 1e12 / self.world  # per device
        record = {"kind": "train", "step": step, **values, "tokens_per_s": tokens_per_s, "tflops": tflops}
        if self.peak:
            record["mfu"] = tflops / self.peak
        tokens_per_step = self.cfg.tokens_per_step(self.dp)
        recent = sorted(self._rates[-20:])
        rate = recent[len(recent) // 2]  # median: robust to one slow step
        record["eta_s"] = (total_steps - step) * tokens_per_step / rate if rate > 0 else float("inf")
        self.write(record)
        if self.enabled and self.cfg.logging.progress:
            mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
            print(f"step {step}/{total_steps} | loss {values.get('loss', float('nan')):.4f} | "
                  f"lr {values.get('lr', 0):.2e} | {_fmt_rate(tokens_per_s)} tok/s | "
                  f"{tflops:.3g} TFLOP/s{mfu} | ETA {_fmt_time(record['eta_s'])}", file=sys.stderr, flush=True)

    def eval(self, step: int, **values) -> None:
        self.write({"kind": "eval", "step": step, **values})
        if self.enabled and self.cfg.logging.progress:
            print(f"eval step {step} | val loss {values['val_loss']:.4f} | ppl {values['val_ppl']:.2f} | "
                  f"{values['val_bpb']:.4f} bits/byte", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
