"""What an external kernel accepts, checked before we call it (and on CPU in tests).

mamba-ssm's and causal-conv1d's C++ entry points TORCH_CHECK their arguments' layouts, strides and
dtypes; each `cuda` backend reimplements those checks (the conditions and messages of the
library's source, cited beside each) in a `prepare_*` function that also applies the library's own
Python-side fixes (its `.contiguous()` calls), so the check sees exactly what the kernel will.
The backend calls `prepare_*` before every kernel call; `testing.cuda_contracts()` calls it on
CPU tensors for every dispatched op of a model's forward and backward (device checks off), so an
argument the kernel would reject fails a CPU test rather than the first GPU run.
"""

from __future__ import annotations

import torch


class ContractError(ValueError):
    """Arguments the external kernel would reject (the library's own check, reimplemented)."""


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def require(ok: bool, library: str, message: str) -> None:
    if not ok:
        raise ContractError(f"{library}: {message}")


def on_cuda(library: str, device_checks: bool, **tensors) -> None:
    """The libraries' `TORCH_CHECK(t.is_cuda())` for every named tensor that is not None."""
    if device_checks:
        for name, t in tensors.items():
            require(t is None or t.is_cuda, library, f"{name} must be a CUDA tensor")


def shape(t: torch.Tensor, want: tuple, library: str, name: str) -> None:
    """CHECK_SHAPE(t, ...)."""
    require(tuple(t.shape) == tuple(want), library, f"{name} must have shape {tuple(want)}, got {tuple(t.shape)}")
