"""`megaxatl eval --ckpt DIR --data SHARDS|TEXT`: loss, perplexity and bits per byte on held-out text.

--data is either a shards folder from `megaxatl prepare-data` (its val split is read, in stored
order; the shards' tokenizer id must equal the checkpoint's tokenizer's) or a .txt/.jsonl file (or
a folder of them, gzip allowed), tokenized here with the checkpoint's tokenizer through the same
code as prepare-data (into a temporary folder, removed afterwards), so every UTF-8 byte of the text
is attributed to exactly one label token and bits per byte are exact. The math is
megaxatl.eval.metrics, the same as training's validation.

A progress line goes to stderr; the result is one JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def add_eval_args(p) -> None:
    p.add_argument("--ckpt", required=True, help="weights: a model folder (transfer output, final/), a sharded folder, "
                                                 "a training checkpoint or a run's checkpoints/ folder (its latest)")
    p.add_argument("--data", required=True,
                   help="a prepare-data shards folder (its val split) or a .txt/.jsonl file or folder")
    p.add_argument("--split", default="val", choices=("val", "train"), help="shards split (default val)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0 = all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None,
                   help="text input: window length (default min(model max_seq_len, 1024)); "
                        "shards: must equal the shards' seq_len")
    p.add_argument("--tokenizer", help="tokenizer folder or .model (default: the checkpoint's tokenizer)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text")
    p.add_argument("--txt-docs", default="file", choices=("file", "paragraph"),
                   help="text files: one document per file, or per blank-line separated paragraph")
    p.add_argument("--no-progress", action="store_true")


def _tokenizer_path(ckpt: Path, override: str | None, own: Path | None = None) -> Path:
    """--tokenizer, else the weights folder's own (its tokenizer/, or the one a training run used)."""
    path = Path(override) if override else own if own is not None else ckpt / "tokenizer"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer (the checkpoint has no tokenizer/ folder; pass --tokenizer)")
    return path


def evaluate_dataset(model, ds, batch_size: int, max_batches: int = 0, progress=None) -> dict:
    """Score every sample of a `ShardDataset` (stored order) -> metrics (metrics.summarize) +
    samples/batches. `progress(done_batches, total_batches, totals)` is called after each batch."""
    import torch

    from megaxatl.eval.metrics import nll_sums, summarize

    n = len(ds)
    total = (n + batch_size - 1) // batch_size
    if max_batches > 0:
        total = min(total, max_batches)
    nll = tokens = nbytes = 0.0
    samples = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(total):
                items = [ds[i] for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
                ids = torch.stack([it["input_ids"] for it in items])
                labels = torch.stack([it["labels"] for it in items])
                s, c = nll_sums(model(ids), labels)
                nll, tokens = nll + s, tokens + c
                nbytes += sum(int(it["num_bytes"]) for it in items)
                samples += len(items)
                if progress is not None:
                    progress(b + 1, total, (nll, tokens, nbytes))
    finally:
        model.train(was_training)
    out = summarize(nll, tokens, nbytes)
    if out is None:
        raise ValueError("no tokens to score (empty data)")
    return {**out, "samples": samples, "batches": total}


def run_eval(args) -> int:
    from megaxatl.checkpoint import open_model
    from megaxatl.data import DataError, prepare_data, tokenizer_id
    from megaxatl.data.format import MANIFEST
    from megaxatl.data.loader import ShardDataset
    from megaxatl.eval.metrics import summarize

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.max_batches < 0:
        raise ValueError("--max-batches must be >= 0")
    ckpt, data = Path(args.ckpt), Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"{data}: no such file or folder")
    model, cfg, meta, own_tok = open_model(ckpt)  # CheckpointError (a ValueError) names the file
    model = model.float().eval()
    tok_path = _tokenizer_path(ckpt, args.tokenizer, own_tok)
    tok_id = tokenizer_id(tok_path)
    t0 = time.time()

    def progress(done, total, totals):
        if args.no_progress:
            return
        m = summarize(*totals) or {"loss": float("nan"), "bpb": float("nan"), "tokens": 0}
        dt = time.time() - t0
        sys.stderr.write(f"\reval: batch {done}/{total}  tokens {m['tokens']}  loss {m['loss']:.4f}  "
                         f"bpb {m['bpb']:.4f}  {m['tokens'] / max(dt, 1e-9):.0f} tok/s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    with tempfile.TemporaryDirectory(prefix="megaxatl-eval-") as tmp:
        if data.is_dir() and (data / MANIFEST).is_file():
            kind, split = "shards", args.split
            ds = ShardDataset(data, split, seq_len=args.seq_len, expected_tokenizer_id=tok_id)
        else:
            kind, split = "text", "all"
            seq_len = args.seq_len or min(cfg.model.max_seq_len, 1024)
            if seq_len < 1:
                raise ValueError("--seq-len must be >= 1")
            prepare_data(data, Path(tmp) / "ds", tok_path, seq_len=seq_len, val_fraction=0.0, val_docs=0,
                         text_field=args.text_field, txt_docs=args.txt_docs, num_proc=1)
            ds = ShardDataset(Path(tmp) / "ds", "train", verify=False)
        if len(ds) == 0:
            raise DataError(f"{data}: the {split} split holds no samples")
        vocab = int(ds.manifest["vocab_size"])
        if vocab > cfg.model.vocab_size:
            raise DataError(f"{data}: tokenizer vocab {vocab} > the model's vocab_size {cfg.model.vocab_size}")
        out = evaluate_dataset(model, ds, args.batch_size, args.max_batches, progress)
        seq_len = ds.seq_len
        ds.close()
    dt = time.time() - t0
    result = {"ckpt": str(ckpt), "data": str(data), "kind": kind, "split": split, **out, "seq_len": seq_len,
              "step": meta.get("step"), "tokenizer_id": tok_id, "seconds": round(dt, 3),
              "tokens_per_s": round(out["tokens"] / max(dt, 1e-9), 1)}
    print(json.dumps(result))
    return 0
