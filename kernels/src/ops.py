"""The public kernel ops: each call picks its backend with dispatch (the requested backend, see
policy.py, else the first available for the tensor's device) and forwards every argument unchanged.

Shapes follow mamba-ssm; see each backend's naive.py for the exact reference semantics.
"""

from __future__ import annotations

from .dispatch import get_impl


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Mamba-1 scan. u, delta, z: (Bt, d, L); A: (d, N); B, C: (Bt, N, L) or (Bt, G, N, L);
    D, delta_bias: (d,); initial_state: (Bt, d, N).
    Returns y (Bt, d, L) in u's dtype [, last_state (Bt, d, N) fp32]."""
    return get_impl("selective_scan", u)(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                         return_last_state)


def mamba_inner(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, out_proj_bias,
                A, D, delta_bias):
    """A Mamba-1 mixer after in_proj: conv, x_proj, dt_proj, scan (softplus dt, D skip, silu(z)
    gate), out_proj. xz: (Bt, 2d, L) [x; z]; conv_weight (d, k); x_proj_weight (R + 2N, d);
    dt_proj_weight (d, R); out_proj_weight (Dm, d); A (d, N), D, delta_bias (d,) fp32.
    Returns (Bt, L, Dm). See selective/inner.py."""
    return get_impl("mamba_inner", xz)(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight,
                                       out_proj_bias, A, D, delta_bias)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One Mamba-1 decode step. state: (Bt, d, N) fp32; x, dt, z: (Bt, d); B, C: (Bt, N) or (Bt, G, N).
    Returns (y (Bt, d), new_state (Bt, d, N) fp32); the input state is not modified."""
    return get_impl("selective_state_update", x)(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=True,
             initial_states=None, return_final_states=False):
    """Mamba-2 SSD scan (mamba_chunk_scan_combined semantics). x, z: (Bt, L, H, P); dt: (Bt, L, H);
    A: (H,); B, C: (Bt, L, G, N); D: (H,) or (H, P); dt_bias: (H,); initial_states: (Bt, H, P, N).
    Returns y (Bt, L, H, P) in x's dtype [, final_states (Bt, H, P, N) fp32]."""
    return get_impl("ssd_scan", x)(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states,
                                   return_final_states)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """One Mamba-2 decode step. state: (Bt, H, P, N) fp32; x, z: (Bt, H, P); dt: (Bt, H); B, C: (Bt, G, N).
    Returns (y (Bt, H, P), new_state (Bt, H, P, N) fp32); the input state is not modified."""
    return get_impl("ssd_state_update", x)(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False):
    """Depthwise causal conv. x: (Bt, d, L); weight: (d, k); bias: (d,); activation None or "silu";
    initial_state: (Bt, d, k-1) previous inputs. Returns y (Bt, d, L) [, final_state (Bt, d, k-1)]."""
    return get_impl("causal_conv1d", x)(x, weight, bias, activation, initial_state, return_final_state)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One conv decode step. x: (Bt, d); conv_state: (Bt, d, k-1).
    Returns (y (Bt, d), new_conv_state (Bt, d, k-1)); the input state is not modified."""
    return get_impl("causal_conv1d_update", x)(x, conv_state, weight, bias, activation)


def gla_scan(q, k, v, g, scale=None, chunk_size=64, initial_state=None, return_final_state=False):
    """Gated linear attention (GLA; retention with a per-head g). q, k: (Bt, L, H, K); v: (Bt, L, H, V);
    g: (Bt, L, H, K) or (Bt, L, H, 1) log decay <= 0; scale: q's scale (None -> K**-0.5);
    initial_state: (Bt, H, K, V). Returns o (Bt, L, H, V) in q's dtype [, final state (Bt, H, K, V) fp32]."""
    return get_impl("gla_scan", q)(q, k, v, g, scale, chunk_size, initial_state, return_final_state)


def gla_state_update(state, q, k, v, g, scale=None):
    """One GLA / retention decode step. state: (Bt, H, K, V) fp32; q, k: (Bt, H, K); v: (Bt, H, V);
    g: (Bt, H, K or 1). Returns (o (Bt, H, V), new state fp32); the input state is not modified."""
    return get_impl("gla_state_update", q)(state, q, k, v, g, scale)
