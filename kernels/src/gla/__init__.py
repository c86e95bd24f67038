"""Gated linear attention scans: GLA (per-key-dim data-dependent decay) and retention (RetNet: a
constant per-head decay, the same recurrence with the decay broadcast over the key dim)."""
