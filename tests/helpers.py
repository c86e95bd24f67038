"""Shared test helpers: one tolerance rule for every numeric comparison."""

from __future__ import annotations

import torch


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / ||expected||_2 in fp64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "actual has non-finite values"
    denom = e.norm()
    return float((a - e).norm() / denom) if denom > 0 else float((a - e).norm())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    err = rel_rms_error(actual, expected)
    assert err <= tol, f"{what}: relative RMS error {err:.3e} > {tol:.1e}"


def decode_gap(model, ref, ids: torch.Tensor, rel=rel_rms_error) -> float:
    """Decode with the recurrent / KV cache on both models (a prefix of 7, then one token) ->
    the larger relative error of `model`'s logits against `ref`'s."""
    with torch.no_grad():
        c_model, c_ref = model.empty_cache(ids.shape[0]), ref.empty_cache(ids.shape[0])
        a, c_model = model(ids[:, :7], c_model)
        b, c_ref = ref(ids[:, :7], c_ref)
        a2, _ = model(ids[:, 7:8], c_model)
        b2, _ = ref(ids[:, 7:8], c_ref)
    return max(rel(a, b), rel(a2, b2))
