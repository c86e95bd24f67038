"""Validation: loss, perplexity and bits per byte over a fixed set of val batches, all ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaxatl.eval.metrics import nll_sums, summarize


@torch.no_grad()
def evaluate(engine, loader, max_batches: int, bytes_per_token: float | None, device) -> dict | None:
    """Mean next-token loss over the first `max_batches` val batches of every rank (the loader
    pads so all ranks run the same number of full-shape batches; padded labels are -100).

    bits/byte = summed loss in nats / ln 2 / UTF-8 bytes those labels cover: the exact per-sample
    byte counts when the shards carry them, else tokens x the manifest's bytes per token.
    """
    was_training = engine.training
    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # nll (nats), label tokens, bytes
    try:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            labels = batch["labels"].to(device)
            logits = engine(batch["input_ids"].to(device))
            nll, count = nll_sums(logits, labels)
            totals[0] += nll
            totals[1] += count
            if "num_bytes" in batch:
                totals[2] += float(torch.as_tensor(batch["num_bytes"]).sum())
    finally:
        engine.train(was_training)
    dist.all_reduce(totals)
    nll, tokens, nbytes = totals.tolist()
    if nbytes == 0 and bytes_per_token:
        nbytes = tokens * bytes_per_token
    m = summarize(nll, tokens, nbytes)
    if m is None:
        return None
    return {"val_loss": m["loss"], "val_ppl": m["ppl"], "val_tokens": m["tokens"], "val_bpb": m["bpb"]}
