"""Layer pattern strings: one symbol per block naming its token mixer.

After Megatron-core's `--hybrid-layer-pattern`, with one difference: every megaxatl block is the
XATL block (norm, mixer, norm, MLP), because the donor's norms and MLP live in it, so there is no
separate MLP symbol. `|` marks a pipeline-stage boundary and is not a layer.

    M  Mamba-1 selective SSM           *  softmax attention (kept from the donor in a hybrid)
    S  Mamba-2 (SSD)                   W  sliding-window softmax attention (model.local_attention)
    R  retention (RetNet)              G  gated linear attention

Example: the paper's 24-layer hybrid with attention at 0-based layers 1 and 11 is
"M*MMMMMMMMM*MMMMMMMMMMMM".
"""

from __future__ import annotations

from dataclasses import dataclass

MIXERS = {
    "M": "mamba",
    "S": "mamba2",
    "*": "attention",
    "W": "sliding_attention",
    "R": "retention",
    "G": "gla",
}
STAGE_BREAK = "|"
# the softmax-attention mixers: one module (models/attention.py), the same parameters; 'W' layers
# see only the last model.local_attention.window positions and use that section's RoPE
ATTENTION_SYMBOLS = "*W"


@dataclass(frozen=True)
class Pattern:
    symbols: list[str]
    # index of the first layer of each pipeline stage after the first, from '|'
    stage_starts: list[int]


def parse_pattern(pattern: str) -> Pattern:
    symbols: list[str] = []
    starts: list[int] = []
    for pos, ch in enumerate(pattern):
        if ch == STAGE_BREAK:
            if not symbols or (starts and starts[-1] == len(symbols)):
                raise ValueError(f"empty pipeline stage at position {pos} of '{pattern}'")
            starts.append(len(symbols))
        elif ch in MIXERS:
            symbols.append(ch)
        else:
            known = ", ".join(f"'{k}' {v}" for k, v in MIXERS.items())
            raise ValueError(f"unknown symbol '{ch}' at position {pos} of '{pattern}' (known: {known}, '|' stage break)")
    if starts and starts[-1] == len(symbols):
        raise ValueError(f"empty last pipeline stage in '{pattern}'")
    return Pattern(symbols, starts)


def hybrid_pattern(n_layers: int, mixer: str, attention_at: list[int]) -> str:
    """E.g. hybrid_pattern(24, 'M', [1, 11]) -> 'M*MMMMMMMMM*MMMMMMMMMMMM'."""
    return "".join("*" if i in attention_at else mixer for i in range(n_layers))
