"""Validation: loss, perplexity and bits per byte over a fixed set of val batches, all ranks."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


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
            nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            totals[0] += float(nll)
            totals[1] += float((labels != -100).sum())
            if "num_bytes" in batch:
                totals[2] += float(torch.as_tensor(batch["num_bytes"]).sum())
    finally:
        engine.train(was_training)
    dist.all_reduce(totals)
    nll, tokens, nbytes = totals.tolist()
    if tokens == 0:
        return None
    if nbytes == 0 and bytes_per_token:
        nbytes = tokens * bytes_per_token
    loss = nll / tokens
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(tokens)}
    out["val_bpb"] = nll / math.log(2) / nbytes if nbytes > 0 else float("nan")
    return out
