"""The one place where loss, perplexity and bits per byte are computed (training's validation,
`megaxatl eval`, benchmarks).

    sums = nll_sums(logits, labels)          # (summed nll in nats, label tokens), fp64 friendly
    summarize(nll, tokens, nbytes)           # -> {"loss", "ppl", "bpb", "tokens", "bytes"}

loss = summed next-token nll (nats) / label tokens; ppl = exp(loss); bits/byte = summed nll / ln 2 /
UTF-8 bytes those labels cover. bpb is NaN when the byte count is unknown (0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def nll_sums(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[float, int]:
    """logits (B, L, V), labels (B, L) already shifted -> (summed nll in nats, counted labels)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                          reduction="sum")
    return float(nll), int((labels != ignore_index).sum())


def summarize(nll: float, tokens: float, nbytes: float) -> dict | None:
    """Totals -> metrics; None when no token was scored."""
    if tokens <= 0:
        return None
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": nll / math.log(2) / nbytes if nbytes > 0
            else float("nan"), "tokens": int(tokens), "bytes": int(nbytes)}
