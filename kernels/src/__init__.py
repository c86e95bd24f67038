"""Scan and conv kernels (installed as megaxatl.kernels).

One folder per op family: selective/ (Mamba-1 selective scan + its decode step), ssd/ (Mamba-2),
conv1d/ (causal depthwise conv), each with naive.py (the pure-PyTorch reference), a fast CPU path,
a Triton kernel and a dispatch to the external GPU libraries (mamba-ssm, causal-conv1d,
flash-linear-attention). `dispatch.py` picks the backend per call, `policy.py` holds what the
config / environment request; see kernels/README.md. (The Mamba-1 folder is not called selective_scan/: a subpackage
binds its name on this package when first imported, which would shadow the selective_scan op.)
"""

# This folder is megaxatl.kernels and nothing else. `kernels` is the import name of Hugging Face's
# kernel hub (PyPI `kernels`, which transformers probes for), so the repository's top-level
# kernels/ holds no __init__.py: from a checkout's root it is at most an empty namespace portion,
# which loses to an installed `kernels` package. This guard makes the one path left,
# `import kernels.src`, fail instead of loading our ops under a name that is not ours.
if __name__ != "megaxatl.kernels":
    raise ImportError(f"{__name__}: megaxatl's kernels are importable only as megaxatl.kernels")

from .dispatch import BackendError, backend_for, describe_backends, startup_report, used
from .ops import (
    causal_conv1d,
    causal_conv1d_update,
    gla_scan,
    gla_state_update,
    mamba_inner,
    selective_scan,
    selective_state_update,
    ssd_scan,
    ssd_state_update,
)
from .policy import configure

__all__ = [
    "BackendError",
    "backend_for",
    "causal_conv1d",
    "causal_conv1d_update",
    "configure",
    "describe_backends",
    "gla_scan",
    "gla_state_update",
    "mamba_inner",
    "selective_scan",
    "selective_state_update",
    "ssd_scan",
    "ssd_state_update",
    "startup_report",
    "used",
]
