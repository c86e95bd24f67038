"""Which attention layers a hybrid keeps, chosen from the donor on calibration text.

A layer's *cost* is how much the donor's mean next-token loss (nats) rises when that layer's
attention output is zeroed, everything else intact: one donor forward per layer. At SmolLM2-135M's
full depth these costs range from 2.7 nats (layer 1) to 0.01, so which layers go matters far more
than how the fresh mixers start.

Selection keeps K of the n attention layers:
- greedy: keep the K costliest (replace the n - K cheapest by their single-layer costs);
- exhaustive: evaluate every K-subset jointly (all the others zeroed at once) and keep the one
  with the lowest joint loss; used when C(n, K) is at most `max_joint` forwards;
- auto (the default): exhaustive when it fits, else greedy; the greedy set's joint loss is always
  measured (one more forward) and reported, so the table says what the choice costs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import combinations

import torch
import torch.nn.functional as F

from megaxatl.config.pattern import STAGE_BREAK, parse_pattern

METHODS = ("auto", "greedy", "exhaustive")


@dataclass
class Selection:
    keep: list[int]                 # 0-based layer indices kept as attention, ascending
    costs: list[float]              # per layer: loss rise (nats) when only it is zeroed
    base_loss: float                # the donor's loss on the calibration tokens
    joint_loss: float               # the loss with every non-kept layer zeroed at once
    method: str                     # what actually chose `keep` ("greedy" / "exhaustive")
    tokens: int                     # calibration tokens scored
    greedy_keep: list[int] = field(default_factory=list)
    greedy_joint_loss: float | None = None
    evaluated: int = 0              # donor forwards spent

    def pattern(self, lci_symbol: str, template: str | None = None) -> str:
        """The layer pattern: '*' at kept layers, `lci_symbol` elsewhere; a `template`'s '|' stage
        breaks stay where they were."""
        n = len(self.costs)
        syms = ["*" if i in self.keep else lci_symbol for i in range(n)]
        if template is None:
            return "".join(syms)
        out, i = [], 0
        for ch in template:
            if ch == STAGE_BREAK:
                out.append(ch)
            else:
                out.append(syms[i])
                i += 1
        return "".join(out)

    def table(self) -> str:
        lines = [f"attention layer selection ({self.method}, {self.tokens} calibration tokens, "
                 f"{self.evaluated} donor forwards); donor loss {self.base_loss:.4f} nats/token",
                 f"{'layer':>5} {'cost (nats)':>12}  kept"]
        order = sorted(range(len(self.costs)), key=lambda i: -self.costs[i])
        rank = {i: r for r, i in enumerate(order)}
        for i, c in enumerate(self.costs):
            lines.append(f"{i:>5} {c:>12.4f}  {'*' if i in self.keep else ''}   (rank {rank[i] + 1})")
        lines.append(f"kept {len(self.keep)} of {len(self.costs)}: {self.keep}; joint loss with the rest zeroed: "
                     f"{self.joint_loss:.4f} (+{self.joint_loss - self.base_loss:.4f})")
        if self.greedy_joint_loss is not None and self.greedy_keep != self.keep:
            lines.append(f"greedy would keep {self.greedy_keep}: joint loss {self.greedy_joint_loss:.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def masked_loss(model, ids: torch.Tensor, zeroed: set[int] | frozenset[int], batch: int = 4) -> float:
    """Mean next-token loss of `model` on ids (N, L + 1) with the mixer output of each layer in
    `zeroed` replaced by zeros (the layer's MLP and residual stay)."""
    hooks = [model.layers[i].mixer.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), out[1]))
             for i in zeroed]
    try:
        total, count = 0.0, 0
        for s in range(0, ids.shape[0], batch):
            chunk = ids[s: s + batch]
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
        return total / count
    finally:
        for h in hooks:
            h.remove()


def select_layers(model, ids: torch.Tensor, keep: int, method: str = "auto", max_joint: int = 64) -> Selection:
    """Keep `keep` of the model's attention layers (all its layers must be attention)."""
    n = len(model.layers)
    if any(layer.symbol != "*" for layer in model.layers):
        raise ValueError("layer selection measures an all-attention model (the donor)")
    if not 0 <= keep <= n:
        raise ValueError(f"keep_attention: {keep} is not between 0 and the donor's {n} layers")
    if method not in METHODS:
        raise ValueError(f"selection method '{method}' is not one of {', '.join(METHODS)}")
    base = masked_loss(model, ids, frozenset())
    costs = [masked_loss(model, ids, {i}) - base for i in range(n)]
    evaluated = n + 1
    # ties broken by the lower index, so the choice is deterministic
    greedy = sorted(sorted(range(n), key=lambda i: (-costs[i], i))[:keep])
    greedy_joint = masked_loss(model, ids, set(range(n)) - set(greedy))
    evaluated += 1
    chosen, joint, used = greedy, greedy_joint, "greedy"
    if method == "exhaustive" or (method == "auto" and math.comb(n, keep) <= max_joint):
        best = None
        for subset in combinations(range(n), keep):
            loss = greedy_joint if list(subset) == greedy else masked_loss(model, ids, set(range(n)) - set(subset))
            evaluated += list(subset) != greedy
            if best is None or loss < best[0]:
                best = (loss, list(subset))
        joint, chosen, used = best[0], best[1], "exhaustive"
    return Selection(chosen, costs, base, joint, used, int(ids[:, 1:].numel()), greedy, greedy_joint, evaluated)


def parse_keep(spec: str | int | float, n_layers: int) -> int:
    """'auto:K' / K -> K layers; 'auto:0.25' / 0.25 (a fraction in (0, 1)) -> round(0.25 * n)."""
    raw = spec
    if isinstance(spec, str):
        if not spec.startswith("auto:"):
            raise ValueError(f"keep_attention: expected 'auto:K' or 'auto:FRACTION', got {raw!r}")
        spec = spec[5:]
        try:
            spec = float(spec) if any(c in spec for c in ".eE") else int(spec)
        except ValueError:
            raise ValueError(f"keep_attention: expected 'auto:K' or 'auto:FRACTION', got {raw!r}") from None
    if isinstance(spec, float) and not spec.is_integer():
        if not 0 < spec < 1:
            raise ValueError(f"keep_attention: a fraction must be in (0, 1), got {raw!r}")
        return max(1, round(spec * n_layers))
    k = int(spec)
    if not 0 <= k <= n_layers:
        raise ValueError(f"keep_attention: {k} layers is not between 0 and {n_layers}")
    return k


def lci_symbol(pattern: str) -> str:
    """The one non-attention mixer symbol of a pattern that selection fills in."""
    kinds = {s for s in parse_pattern(pattern).symbols if s != "*"}
    if len(kinds) != 1:
        raise ValueError(f"pattern '{pattern}': keep_attention needs exactly one LCI mixer symbol to place "
                         f"beside the kept attention layers, found {sorted(kinds) or 'none'}")
    return kinds.pop()


def select_for_config(cfg, donor_path, text: str, tokens: int = 4096, seq_len: int = 256,
                      method: str = "auto", teacher=None) -> Selection:
    """Resolve cfg.transfer.keep_attention in place: measure the donor, rewrite cfg.model.pattern
    (full depth only: costs measured in the full donor say nothing about a cut model's layers)."""
    from megaxatl.transfer.donor_model import calibration_ids, donor_model

    model, tok_dir, n_donor = teacher if teacher is not None else donor_model(donor_path)
    m = cfg.model
    if m.n_layers != n_donor:
        raise ValueError(f"transfer.keep_attention: the target has {m.n_layers} layers, the donor {n_donor}; "
                         "selection needs a full-depth target")
    if cfg.transfer.layer_map is not None and list(cfg.transfer.layer_map) != list(range(n_donor)):
        raise ValueError("transfer.keep_attention: needs the identity layer_map (target layer i <- donor layer i)")
    keep = parse_keep(cfg.transfer.keep_attention, n_donor)
    symbol = lci_symbol(m.pattern)
    ids = calibration_ids(text, tok_dir, tokens, min(seq_len, m.max_seq_len))
    sel = select_layers(model, ids, keep, method)
    m.pattern = sel.pattern(symbol, m.pattern)
    cfg.transfer.keep_attention = None
    return sel
