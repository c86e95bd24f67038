"""Scan and conv kernels (installed as megaxatl.kernels).

One folder per op family: selective/ (Mamba-1 selective scan + its decode step), ssd/ (Mamba-2),
conv1d/ (causal depthwise conv), each with naive.py (the pure-PyTorch reference), a fast CPU path,
a Triton kernel and a mamba-ssm / causal-conv1d CUDA dispatch. `dispatch.py` picks the backend per
call; see kernels/README.md. (The Mamba-1 folder is not called selective_scan/: a subpackage
binds its name on this package when first imported, which would shadow the selective_scan op.)
"""

# This folder is megaxatl.kernels and nothing else. `kernels` is the import name of Hugging Face's
# kernel hub (PyPI `kernels`, which transformers probes for), so the repository's top-level
# kernels/ holds no __init__.py: from a checkout's root it is at most an empty namespace portion,
# which loses to an installed `kernels` package. This guard makes the one path left,
# `import kernels.src`, fail instead of loading our ops under a name that is not ours.
if __name__ != "megaxatl.kernels":
    raise ImportError(f"{__name__}: megaxatl's kernels are importable only as megaxatl.kernels")

from .dispatch import backend_for, describe_backends
from .ops import (
    causal_conv1d,
    causal_conv1d_update,
    gla_scan,
    gla_state_update,
    selective_scan,
    selective_state_update,
    ssd_scan,
    ssd_state_update,
)

__all__ = [
    "backend_for",
    "causal_conv1d",
    "causal_conv1d_update",
    "describe_backends",
    "gla_scan",
    "gla_state_update",
    "selective_scan",
    "selective_state_update",
    "ssd_scan",
    "ssd_state_update",
]
