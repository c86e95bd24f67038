"""Validation: loss, perplexity and bits per byte over a fixed set of val batches, all ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaxatl.eval.metrics import nll_sums, summarize
from megaxatl.train.engine import collective_device


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
    totals = totals.to(collective_device())
    dist.all_reduce(totals)
    nll, tokens, nbytes = totals.tolist()
    if nbytes == 0 and bytes_per_token:
        nbytes = tokens * bytes_per_token
    m = summarize(nll, tokens, nbytes)
    if m is None:
        return None
    return {"val_loss": m["loss"], "val_ppl": m["ppl"], "val_tokens": m["tokens"], "val_bpb": m["bpb"]}


@torch.no_grad()
def evaluate_pipeline(engine, loader, max_batches: int, bytes_per_token: float | None, device) -> dict | None:
    """The same measure through DeepSpeed's pipeline engine: its eval_batch runs the val batches as
    one inference schedule and returns the mean of the per-batch mean losses, averaged over DP.
    Only the last stage sees labels, so tokens are counted as full batches (the loader pads the
    last ones with ignored labels: a slight undercount of the mean there) and bits per byte uses
    the manifest's bytes per token."""
    n = min(max_batches, len(loader))
    if n == 0:
        return None
    dp = engine.grid.get_data_parallel_world_size()
    shape: list[int] = []

    def batches():
        for b in loader:
            shape[:] = [b["labels"].numel()]
            yield b["input_ids"].to(device), b["labels"].to(device)

    was_training = engine.module.training
    try:
        loss = float(engine.eval_batch(batches(), num_micro_batches=n))
    finally:
        engine.module.train(was_training)
    # the first and last stages read batches; the others count the configured batch shape
    per_batch = shape[0] if shape else loader.micro_batch_size * loader.dataset.seq_len
    tokens = n * per_batch * dp
    m = summarize(loss * tokens, tokens, tokens * bytes_per_token if bytes_per_token else 0.0)
    if m is None:
        return None
    return {"val_loss": m["loss"], "val_ppl": m["ppl"], "val_tokens": m["tokens"], "val_bpb": m["bpb"]}
