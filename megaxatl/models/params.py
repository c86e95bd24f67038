"""Parameter markers, read in one place by the optimizer builder and the mixed-precision code.

mamba-ssm's convention: `A_log`, `D` and the dt bias are kept in fp32 and never weight-decayed
(decaying them pulls the SSM towards A = -1, D = 0). Norm weights, biases and (by default)
embeddings are not decayed either; those are recognised by module type, not by name matching.

fp32 under bf16 training: DeepSpeed's bf16 engine casts every parameter to bf16 (its
`keep_in_fp32_modules` covers buffers only) and keeps fp32 masters in the optimizer. A forward
reads a marked parameter through `fp32(p)`: the master the trainer attached (train/fp32_params.py)
when there is one, else p itself in fp32. The bf16 rounding is not small for these: bf16 keeps 8
bits, so A_log = log 16 is off by up to 0.0078 (A by 0.8 %) and a dt bias near -6 by up to 0.016
(dt by 1.6 %) in every step's forward.
"""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY = "_megaxatl_no_decay"
KEEP_FP32 = "_megaxatl_keep_fp32"
FP32_MASTER = "_megaxatl_fp32_master"  # the fp32 value a forward reads (set by the trainer)


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


def fp32(p: torch.Tensor) -> torch.Tensor:
    """The fp32 value of a `keeps_fp32` parameter for a forward: its attached fp32 master when p
    is held in a lower precision (the gradient still flows to p), else p in fp32.

    lo + (master - lo) is master exactly: lo is master rounded to bf16, within a factor 2 of it,
    so the difference is exact in fp32 (Sterbenz) and so is the sum."""
    master = getattr(p, FP32_MASTER, None)
    if master is None or p.dtype == torch.float32:
        return p.float()
    lo = p.float()
    return lo + (master.reshape(p.shape) - lo).detach()
