"""Parameter markers, read in one place by the optimizer builder and the mixed-precision code.

mamba-ssm's convention: `A_log` and `D` are kept in fp32 and never weight-decayed (decaying them
pulls the SSM towards A = -1, D = 0). Norm weights, biases and (by default) embeddings are not
decayed either; those are recognised by module type, not by name matching.
"""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY = "_megaxatl_no_decay"
KEEP_FP32 = "_megaxatl_keep_fp32"


def mark_no_decay(p: nn.Parameter) -> nn.Parameter:
    setattr(p, NO_DECAY, True)
    return p


def mark_fp32(p: nn.Parameter) -> nn.Parameter:
    setattr(p, KEEP_FP32, True)
    setattr(p, NO_DECAY, True)
    return p


def is_no_decay(p: torch.Tensor) -> bool:
    return bool(getattr(p, NO_DECAY, False))


def keeps_fp32(p: torch.Tensor) -> bool:
    return bool(getattr(p, KEEP_FP32, False))
