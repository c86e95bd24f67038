"""The block's MLP in the donor's shape: GELU/ReLU two-layer (Pythia, GPT-2), or gated: SwiGLU
(Llama: down(silu(gate(x)) * up(x))) and GeGLU with tanh GELU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# gated MLPs (config.schema.GATED_MLPS): the nonlinearity on the gate
_GATED = {"swiglu": F.silu, "geglu_tanh": _ACT["gelu_tanh"]}


class MLP(nn.Module):
    """x: (B, L, D) -> (B, L, D). up_proj (d_mlp, D), down_proj (D, d_mlp), gate_proj when gated."""

    def __init__(self, d_model: int, d_mlp: int, kind: str, bias: bool):
        super().__init__()
        self.kind = kind
        if kind in _GATED:
            self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        elif kind not in _ACT:
            raise ValueError(f"unknown mlp '{kind}'")
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in _GATED:
            h = _GATED[self.kind](self.gate_proj(x)) * self.up_proj(x)
        else:
            h = _ACT[self.kind](self.up_proj(x))
        return self.down_proj(h)
