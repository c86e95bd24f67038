"""Decode latency and state memory vs context length: our LCI model (pure Mamba) vs a transformers
Llama with a KV cache, same width and depth, measured side by side in one process.

Setting (SmolLM2-135M's block, 8 of its 30 layers): d_model 576, 8 layers, SwiGLU MLP 1536,
RMSNorm, tied embeddings, vocab 49152. Ours: every block is norm -> Mamba (d_state 16, d_conv 4,
expand 1.0 as configs/mamba_smollm2_135m.json, so the mixer has about the attention layer's parameter
count) -> norm -> MLP, i.e. the XATL block. Llama: 9 heads / 3 KV heads (GQA), head_dim 64, sdpa,
`DynamicCache`. fp32, batch 1, greedy.

For each context length T: prefill T random tokens (the hidden states only; logits of the last
position), then time `--steps` single-token decode steps (each one forward with the cache + argmax),
alternating one step of ours and one of Llama so that load from other processes hits both alike,
and take each one's median. One intra-op thread by default (see --threads). Reported per T: ms/token for both, and the
bytes of the decoding state (ours: the Mamba conv + SSM states, constant; Llama: the K/V tensors of
the cache, linear in T). At the end the growth ratio ms/token at the longest / shortest context for
each (DESIGN.md target for ours: <= 1.3x).

    python benchmarks/decode.py                 # T = 256 ... 8192, 2 sweeps (~4 min on 2 CPU cores)
    python benchmarks/decode.py --quick         # T = 256, 1024, 2048, fewer steps (~30 s)
    python benchmarks/decode.py --json out.json --vocab 8192 --steps 32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch

CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_CONTEXTS = (256, 1024, 2048)


def build_ours(d_model: int, layers: int, vocab: int, d_mlp: int, expand: float):
    from megaxatl.config import config_from_dict
    from megaxatl.models import build

    cfg = config_from_dict({"model": {
        "vocab_size": vocab, "d_model": d_model, "n_layers": layers, "pattern": "M" * layers, "norm": "rmsnorm",
        "mlp": "swiglu", "d_mlp": d_mlp, "tie_embeddings": True, "max_seq_len": max(CONTEXTS) + 1024,
        "mamba": {"d_state": 16, "d_conv": 4, "expand": expand}}})
    return build(cfg).eval()


def build_llama(d_model: int, layers: int, vocab: int, d_mlp: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=d_mlp, max_position_embeddings=max(CONTEXTS) + 1024,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable in a (nested) cache object."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    if hasattr(obj, "layers"):  # transformers' Cache: a list of layers holding keys / values
        return sum(tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))
                   for layer in obj.layers)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


class OursDecoder:
    """Prefill then one token per `step()`, with our recurrent cache."""

    def __init__(self, model, prompt: torch.Tensor):
        self.model = model
        t0 = time.perf_counter()
        with torch.no_grad():
            hidden, self.cache = model.hidden_states(prompt, model.empty_cache(prompt.shape[0]))
            self.tok = model.logits(hidden[:, -1:]).argmax(-1)
        self.prefill_s = time.perf_counter() - t0

    @torch.no_grad()
    def step(self) -> None:
        logits, self.cache = self.model(self.tok, self.cache)
        self.tok = logits[:, -1:].argmax(-1)


class LlamaDecoder:
    """Prefill then one token per `step()`, with transformers' DynamicCache (the KV cache)."""

    def __init__(self, model, prompt: torch.Tensor):
        from transformers import DynamicCache

        self.model = model
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(prompt, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        self.tok, self.cache = out.logits[:, -1:].argmax(-1), out.cache
        self.prefill_s = time.perf_counter() - t0

    @torch.no_grad()
    def step(self) -> None:
        out = self.model(self.tok, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.tok, self.cache = out.logits[:, -1:].argmax(-1), out.cache


def measure(ours, llama, prompt: torch.Tensor, steps: int) -> tuple[dict, dict]:
    """Prefill both, then alternate single decode steps (ours, llama, ours, ...) so that a burst of
    load from other processes hits both alike; the median step of each."""
    decs = {"ours": OursDecoder(ours, prompt), "llama": LlamaDecoder(llama, prompt)}
    times: dict[str, list[float]] = {k: [] for k in decs}
    for _ in range(steps):
        for k, d in decs.items():
            t = time.perf_counter()
            d.step()
            times[k].append(time.perf_counter() - t)
    res = tuple({"prefill_s": d.prefill_s, "ms_per_token": 1e3 * statistics.median(times[k]),
                 "ms_min": 1e3 * min(times[k]), "state_bytes": tensor_bytes(d.cache)} for k, d in decs.items())
    return res  # type: ignore[return-value]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXTS}, 8 steps")
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="decode steps timed per context (median)")
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--d-mlp", type=int, default=1536)
    ap.add_argument("--expand", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=None,
                    help="sweeps over all contexts (default 2, quick 1); per context and model the lowest "
                         "median counts (a shared machine's bursts only ever slow a sweep down)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: batch-1 decode is a chain of small ops, and on a shared "
                         "CPU 2 threads stall at every op's barrier; measured 100+ ms/token vs 23 with 1)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    contexts = args.contexts or (QUICK_CONTEXTS if args.quick else CONTEXTS)
    steps = args.steps or (8 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = build_ours(args.d_model, args.layers, args.vocab, args.d_mlp, args.expand)
    llama = build_llama(args.d_model, args.layers, args.vocab, args.d_mlp)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_llama = sum(p.numel() for p in llama.parameters())
    print(f"d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, fp32, batch 1, "
          f"{torch.get_num_threads()} threads; params: ours {n_ours / 1e6:.1f}M, llama {n_llama / 1e6:.1f}M; "
          f"{steps} decode steps per context (median)", flush=True)
    # warm-up (first-call allocations, kernel selection)
    measure(ours, llama, torch.randint(0, args.vocab, (1, 32)), 2)
    header = (f"{'context':>8} | {'ours ms/tok':>11} | {'llama ms/tok':>12} | {'ours state':>10} | {'llama KV':>10} | "
              f"{'prefill ours s':>14} | {'prefill llama s':>15}")
    best: dict[int, dict] = {}
    for rep in range(repeats):
        print(f"sweep {rep + 1}/{repeats}", flush=True)
        print(header, flush=True)
        for T in contexts:
            prompt = torch.randint(0, args.vocab, (1, T))
            a, b = measure(ours, llama, prompt, steps)
            print(f"{T:>8} | {a['ms_per_token']:>11.2f} | {b['ms_per_token']:>12.2f} | "
                  f"{a['state_bytes'] / 2**20:>8.2f}MB | {b['state_bytes'] / 2**20:>8.2f}MB | "
                  f"{a['prefill_s']:>14.2f} | {b['prefill_s']:>15.2f}", flush=True)
            row = best.setdefault(T, {"context": T, "runs": {"ours": [], "llama": []}})
            for k, r in (("ours", a), ("llama", b)):
                row["runs"][k].append(r["ms_per_token"])
                if k not in row or r["ms_per_token"] < row[k]["ms_per_token"]:
                    row[k] = r
    rows = [best[T] for T in contexts]
    if repeats > 1:
        print(f"best of {repeats} sweeps (lowest median per context and model)")
        print(header)
        for r in rows:
            a, b = r["ours"], r["llama"]
            print(f"{r['context']:>8} | {a['ms_per_token']:>11.2f} | {b['ms_per_token']:>12.2f} | "
                  f"{a['state_bytes'] / 2**20:>8.2f}MB | {b['state_bytes'] / 2**20:>8.2f}MB | "
                  f"{a['prefill_s']:>14.2f} | {b['prefill_s']:>15.2f}")
    first, last = rows[0], rows[-1]
    growth = {k: last[k]["ms_per_token"] / first[k]["ms_per_token"] for k in ("ours", "llama")}
    # the fastest single step: the least disturbed by other processes on a shared machine
    growth_min = {k: last[k]["ms_min"] / first[k]["ms_min"] for k in ("ours", "llama")}
    summary = {
        "growth_ours": growth["ours"], "growth_llama": growth["llama"],
        "growth_ours_fastest_step": growth_min["ours"], "growth_llama_fastest_step": growth_min["llama"],
        "contexts": [first["context"], last["context"]],
        "speedup_at_longest": last["llama"]["ms_per_token"] / last["ours"]["ms_per_token"],
        "state_bytes_ours": last["ours"]["state_bytes"], "kv_bytes_llama_at_longest": last["llama"]["state_bytes"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "target_growth_ours_max": 1.3, "target_met": growth["ours"] <= 1.3,
    }
    print(f"growth {last['context']}/{first['context']}: ours {growth['ours']:.2f}x "
          f"(target <= 1.3x: {'met' if summary['target_met'] else 'NOT met'}), llama {growth['llama']:.2f}x; "
          f"at {last['context']}: ours {summary['speedup_at_longest']:.2f}x faster per token, state "
          f"{summary['state_bytes_ours'] / 2**10:.0f} KB vs KV cache {summary['kv_bytes_llama_at_longest'] / 2**20:.1f} MB; "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB")
    print(f"growth of the fastest step: ours {growth_min['ours']:.2f}x, llama {growth_min['llama']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "machine": platform.machine(),
                       "params": {"ours": n_ours, "llama": n_llama}, "rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
