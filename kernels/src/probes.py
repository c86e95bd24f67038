"""Can a backend load here? One probe per requirement, named, cached, with the reason when not.

A backend names what it needs as "module" or "module:attribute" strings. Each is imported (and
the attribute read, which must not be None) the first time a backend needing it is considered; the
answer is cached for the process. The probes import the very functions the backend calls and the
compiled modules behind them, never just a package's top level: `import mamba_ssm` can succeed
while `selective_scan_cuda` (its CUDA extension, opt-in on mamba-ssm's main branch) is missing,
and then the first forward would raise.

What each external backend needs (the `cuda` backends; kernels/README.md):

    mamba-ssm selective_scan_fn    its interface + the compiled `selective_scan_cuda`
    mamba-ssm mamba_inner_fn       the above + causal-conv1d's compiled functions
    mamba-ssm Triton SSD / decode  its Triton modules (whose package import may also need
                                   `selective_scan_cuda`: mamba-ssm 2.3 imports it at top level)
    causal-conv1d                  causal_conv1d_fn / causal_conv1d_update + `causal_conv1d_cuda`
    flash-linear-attention         fla.ops.gla / fla.ops.simple_gla (Triton), fla-core >= 0.6
"""

from __future__ import annotations

import importlib
from functools import lru_cache


@lru_cache(maxsize=None)
def probe(requirement: str) -> str | None:
    """None when `requirement` ("module" or "module:attr") loads here, else why not (one line)."""
    module, _, attr = requirement.partition(":")
    try:
        mod = importlib.import_module(module)
        if attr and getattr(mod, attr, None) is None:
            return f"{module}.{attr} is missing or None"
    except Exception as e:  # a broken CUDA extension raises more than ImportError (OSError, RuntimeError)
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        return f"{module}: {type(e).__name__}: {msg}".rstrip(": ")
    return None


def first_problem(requirements: tuple[str, ...]) -> str | None:
    """The first requirement that does not load (its reason), or None when all do."""
    for r in requirements:
        why = probe(r)
        if why is not None:
            return why
    return None


def clear() -> None:
    """Forget every answer (tests that install / remove a module)."""
    probe.cache_clear()


# ---- what the external libraries' entry points need ------------------------------------------
MAMBA_SCAN = ("mamba_ssm.ops.selective_scan_interface:selective_scan_fn", "selective_scan_cuda")
MAMBA_INNER = MAMBA_SCAN + ("mamba_ssm.ops.selective_scan_interface:mamba_inner_fn",
                            "mamba_ssm.ops.selective_scan_interface:causal_conv1d_fwd_function",
                            "causal_conv1d_cuda")
MAMBA_SSD = ("mamba_ssm.ops.triton.ssd_combined:mamba_chunk_scan_combined",)
MAMBA_STATE_UPDATE = ("mamba_ssm.ops.triton.selective_state_update:selective_state_update",)
CAUSAL_CONV1D = ("causal_conv1d:causal_conv1d_fn", "causal_conv1d_cuda")
CAUSAL_CONV1D_UPDATE = ("causal_conv1d:causal_conv1d_update", "causal_conv1d_cuda")
FLA_SCAN = ("fla.ops.gla:chunk_gla", "fla.ops.simple_gla:chunk_simple_gla")
FLA_STEP = ("fla.ops.gla:fused_recurrent_gla", "fla.ops.simple_gla:fused_recurrent_simple_gla")
TRITON = ("triton",)
