"""Decoding with recurrent state: constant memory per Mamba layer, a KV cache per attention layer.

Prompts of different lengths share one batch without padding: all rows advance together from
the shortest prompt's end, and a row still inside its prompt is fed its own next prompt token
(teacher forcing) instead of a sample. No pad token ever enters a recurrent state.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) -> token ids (B,). temperature 0 -> greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, eos_token_id: int | None = None, seed: int | None = None) -> Iterator[list[int | None]]:
    """Yield, per decoding step, one new token per prompt (None for a row that is finished or
    still reading its prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    lens = [len(p) for p in prompts]
    start = min(lens)
    cache = model.empty_cache(len(prompts))
    logits, cache = model(torch.tensor([p[:start] for p in prompts], device=device), cache)
    last = logits[:, -1]
    done = [False] * len(prompts)
    produced = [0] * len(prompts)
    pos = start
    while True:
        nxt = sample_next(last, temperature, top_k, top_p, gen).tolist()
        step_out: list[int | None] = []
        feed = []
        for b, p in enumerate(prompts):
            if pos < lens[b]:  # still inside this row's prompt
                feed.append(p[pos])
                step_out.append(None)
            elif done[b]:
                feed.append(nxt[b])  # keeps the batch rectangular; the output is ignored
                step_out.append(None)
            else:
                feed.append(nxt[b])
                step_out.append(nxt[b])
                produced[b] += 1
                if (eos_token_id is not None and nxt[b] == eos_token_id) or produced[b] >= max_new_tokens:
                    done[b] = True
        yield step_out
        if all(done):
            return
        logits, cache = model(torch.tensor(feed, device=device)[:, None], cache)
        last = logits[:, -1]
        pos += 1


def generate(model, prompts: list[list[int]], max_new_tokens: int, on_token: Callable | None = None,
             **kwargs) -> list[list[int]]:
    """Returns the new tokens of each prompt; `on_token(row, token)` streams them as they come."""
    was_training = model.training
    model.eval()
    outs: list[list[int]] = [[] for _ in prompts]
    try:
        for step in stream(model, prompts, max_new_tokens, **kwargs):
            for b, tok in enumerate(step):
                if tok is not None:
                    outs[b].append(tok)
                    if on_token is not None:
                        on_token(b, tok)
    finally:
        model.train(was_training)
    return outs
