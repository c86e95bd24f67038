"""GLA and retention through flash-linear-attention's Triton kernels (the `cuda` backend; fla-core).

Our contract (naive.gla_recurrent): q, k (Bt, L, H, K), v (Bt, L, H, V), g (Bt, L, H, K) per key dim
(GLA) or (Bt, L, H, 1) per head (retention), natural-log decays <= 0, fp32 states (Bt, H, K, V).
fla's layout is the same (B, T, H, ...); the mapping:

    per-key-dim g            fla.ops.gla.chunk_gla(q, k, v, g, scale, initial_state, output_final_state)
    per-head g, constant     fla.ops.simple_gla.chunk_simple_gla(..., g_gamma=(H,))  (retention: the g
      over batch and time    our retention mixer builds by expand(); no per-token decay to read)
    per-head g, otherwise    chunk_simple_gla(..., g=(Bt, L, H))
    one decode step          fused_recurrent_gla / fused_recurrent_simple_gla on L = 1

Not chunk_retention: it hard-codes torchscale's gamma from the *local* head index, wrong under
tensor parallelism and for configured decays. fla picks its own chunk (64); our chunk_size is
ignored here. Outputs come back in q's dtype, states in fp32.

# GPU path: chunk_gla / chunk_simple_gla run only on a GPU (their Triton loops do not run under the
# interpreter: `i_t.to(tl.int64)` on a Python int). On CPU the tests run fla's fused_recurrent
# kernels under TRITON_INTERPRET=1 against naive.py, and this argument mapping against fla's own
# reference functions in place of the chunk kernels (tests/check_fla_gla.py, run by tests/test_gla.py).
"""

from __future__ import annotations

import torch

from ..contract import require

LIB = "flash-linear-attention"


def _constant_per_head(g: torch.Tensor) -> bool:
    """g (Bt, L, H, 1) that is one value per head (stride 0 over batch and time), needing no grad."""
    return g.shape[-1] == 1 and not g.requires_grad and g.stride(0) == 0 and g.stride(1) == 0


def prepare_gla_scan(q, k, v, g, scale=None, chunk_size=64, initial_state=None, return_final_state=False,
                     device_checks: bool = True):
    """-> (fla function name, kwargs) for this call, checked as fla checks them (chunk_gla's
    asserts, chunk_bwd_dv's even K / V for 16-bit inputs; fla checks no device: Triton runs on
    whatever its driver drives, `device_checks` is accepted for the shared contract signature)."""
    bsz, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    require(k.shape == q.shape, LIB, f"k {tuple(k.shape)} must have q's shape {tuple(q.shape)}")
    require(v.shape[:3] == q.shape[:3], LIB, f"v must be ({bsz}, {seqlen}, {heads}, V), got {tuple(v.shape)}")
    require(g.shape[:3] == q.shape[:3] and g.shape[-1] in (1, dk), LIB,
            f"g must be ({bsz}, {seqlen}, {heads}, {dk} or 1), got {tuple(g.shape)}")
    if q.dtype in (torch.float16, torch.bfloat16):
        require(dk % 2 == 0 and dv % 2 == 0, LIB, f"16-bit inputs need even K and V, got K={dk}, V={dv}")
    kw = dict(q=q, k=k.to(q.dtype), v=v.to(q.dtype), scale=dk ** -0.5 if scale is None else float(scale),
              initial_state=None if initial_state is None else initial_state.float(),
              output_final_state=bool(return_final_state))
    if g.shape[-1] == dk and dk != 1:
        return "chunk_gla", dict(kw, g=g.float())
    if _constant_per_head(g):
        return "chunk_simple_gla", dict(kw, g_gamma=g[0, 0, :, 0].float().contiguous())
    return "chunk_simple_gla", dict(kw, g=g[..., 0].float())


def _fla(name: str):
    if name == "chunk_gla":
        from fla.ops.gla import chunk_gla as fn
    elif name == "chunk_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla as fn
    elif name == "fused_recurrent_gla":
        from fla.ops.gla import fused_recurrent_gla as fn
    else:
        from fla.ops.simple_gla import fused_recurrent_simple_gla as fn
    return fn


def gla_scan(q, k, v, g, scale=None, chunk_size=64, initial_state=None, return_final_state=False):
    """Same contract as naive.gla_recurrent, on CUDA tensors."""
    name, kw = prepare_gla_scan(q, k, v, g, scale, chunk_size, initial_state, return_final_state)
    o, state = _fla(name)(**kw)
    o = o.to(q.dtype)
    return (o, state.float()) if return_final_state else o


def gla_state_update(state, q, k, v, g, scale=None):
    """Same contract as naive.gla_state_update (functional), through fla's fused recurrent kernels
    on one step. q, k: (Bt, H, K); v: (Bt, H, V); g: (Bt, H, K or 1); state (Bt, H, K, V) fp32."""
    dk = q.shape[-1]
    s = dk ** -0.5 if scale is None else float(scale)
    q1, k1, v1, g1 = (t.unsqueeze(1) for t in (q, k, v, g))  # (Bt, 1, H, .)
    if g.shape[-1] == dk and dk != 1:
        o, new = _fla("fused_recurrent_gla")(q1, k1.to(q.dtype), v1.to(q.dtype), gk=g1.float(), scale=s,
                                             initial_state=state.float(), output_final_state=True)
    else:
        o, new = _fla("fused_recurrent_simple_gla")(q1, k1.to(q.dtype), v1.to(q.dtype), g=g1[..., 0].float(), scale=s,
                                                    initial_state=state.float(), output_final_state=True)
    return o[:, 0].to(q.dtype), new.float()
