"""Loader throughput per rank: random access (local files) against streaming (webdataset, local
path and `pipe:cat`), beside what a 2.8B run needs per GPU at the planner's step time.

    python benchmarks/data_stream.py [--mb 24] [--seq-len 2048] [--gpus 64] [--gpu-mem 80]

1. Data: a synthetic corpus (random words), a byte-level BPE tokenizer trained on it, then
   `prepare_data` (the real writer) at --seq-len, shards of 128 samples.
2. Each loader yields training batches of 8 sequences for rank 0 of a DP world of 1, 8 and the
   planner's dp
   (the DP world matters for streaming: every rank reads every shard and keeps its own samples);
   tokens/s per rank = tokens handed to the caller / wall time, one warm-up pass over the stream
   discarded (page cache warm for all: the comparison is of the readers, not of the disk).
3. Need: `megaxatl plan` on configs/mamba_2.8b.json (bf16, seq 2048, micro-batch 8) on --gpus
   GPUs: the fastest fitting layout's step time; a DP rank must deliver its micro-batches of one
   step (tokens per step / dp) within that time, shared by its tp x pp GPUs (the same batch).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_dataset(root: Path, mb: int, seq_len: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megaxatl.data import prepare_data

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    corpus = root / "corpus"
    corpus.mkdir()
    with open(corpus / "a.txt", "w") as f:
        size = 0
        while size < mb << 20:
            line = " ".join(rng.choice(words) for _ in range(200)) + "\n\n"
            f.write(line)
            size += len(line)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words)] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(root / "tok")
    prepare_data([corpus / "a.txt"], root / "ds", root / "tok", seq_len=seq_len, txt_docs="paragraph", val_docs=1,
                 shard_tokens=128 * seq_len, num_proc=2)
    return root / "ds"


def rate(make, batches: int) -> float:
    loader = make()
    list(itertools.islice(iter(loader), batches))  # warm-up pass
    loader = make()
    t = time.perf_counter()
    tokens = sum(int(b["input_ids"].numel()) for b in itertools.islice(iter(loader), batches))
    return tokens / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=24, help="corpus size in MiB of text")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--gpu-mem", type=float, default=80.0)
    args = ap.parse_args()

    from megaxatl.cluster.plan import plan
    from megaxatl.config import load_config
    from megaxatl.data import build_loader
    from megaxatl.data.stream import build_stream_loader

    cfg = load_config(REPO / "configs" / "mamba_2.8b.json")
    fits, _ = plan(cfg, args.gpus, args.gpu_mem)
    best = fits[0]
    need_dp_rank = best.tokens_per_s / best.dp
    need_gpu = best.tokens_per_s / args.gpus

    B = 8
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp), args.mb, args.seq_len)
        probe = build_loader(ds, "train", B, args.seq_len)
        n = probe.dataset.num_samples
        print(f"dataset: {n} train samples of {args.seq_len} tokens in {len(probe.dataset.shards)} shards")
        results = {}
        for world in sorted({1, 8, best.dp}):
            batches = max(4, n // (B * world))  # one epoch of this rank's share
            kinds = {
                "random access (pread)": lambda: build_loader(ds, "train", B, args.seq_len, dp_world=world),
                "stream, local path": lambda: build_stream_loader(ds, "train", B, args.seq_len, dp_world=world),
                "stream, pipe:cat": lambda: build_stream_loader(f"pipe:cat {ds}/{{name}}", "train", B,
                                                                args.seq_len, dp_world=world),
            }
            for kind, make in kinds.items():
                results[(kind, world)] = rate(make, batches)

    print(f"\nneed: configs/mamba_2.8b.json on {args.gpus} x {args.gpu_mem:g} GiB, planner's fastest layout "
          f"TP {best.tp} x PP {best.pp} x DP {best.dp}, ZeRO {best.zero}, step {best.step_s:.2f} s, "
          f"{best.tokens_per_s:.0f} tokens/s in all")
    print(f"      {need_gpu:.0f} tokens/s per GPU; {need_dp_rank:.0f} tokens/s per DP rank (its tp x pp GPUs "
          "share one loader's batches)\n")
    print("| loader | DP world | tokens/s per rank | / need per DP rank |")
    print("|---|---|---|---|")
    for (kind, world), r in results.items():
        print(f"| {kind} | {world} | {r:,.0f} | {r / need_dp_rank:,.0f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
