"""Kernel backend registry: automatic choice, env overrides, clear errors, the C++ fallback."""

import pytest
import torch

from megaxatl import kernels
from megaxatl.kernels import dispatch
from megaxatl.kernels.dispatch import BackendError
from megaxatl.kernels.selective import cpu as scan_cpu
from megaxatl.kernels.testing import scan_inputs

OPS = list(dispatch.REGISTRY)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MEGAXATL_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MEGAXATL_KERNELS_STRICT", raising=False)
    for op in OPS:
        monkeypatch.delenv(f"MEGAXATL_KERNEL_{op.upper()}", raising=False)
    yield
    dispatch._forget()


def test_cpu_default_is_the_cpu_backend():
    for op in OPS:
        assert dispatch.backend_for(op, torch.zeros(1)) == "cpu", op


def test_every_registered_backend_imports():
    for op, backends in dispatch.REGISTRY.items():
        for b in backends:
            if b.name in ("triton",):  # importing jit kernels here would fix the interpreter mode
                continue
            assert callable(dispatch.load(op, b.name)), (op, b.name)


def test_global_override(monkeypatch):
    monkeypatch.setenv("MEGAXATL_KERNELS", "naive")
    with_naive = [op for op in OPS if "naive" in dispatch._backends(op)]
    assert with_naive and all(dispatch.backend_for(op, "cpu") == "naive" for op in with_naive)
    # an op without that backend (the fused Mamba-1 inner path) keeps its automatic choice
    assert dispatch.backend_for("mamba_inner", "cpu") == "cpu"
    monkeypatch.setenv("MEGAXATL_KERNELS", "TORCH")  # case-insensitive
    assert dispatch.backend_for("selective_scan", "cpu") == "torch"


def test_per_op_override_wins(monkeypatch):
    monkeypatch.setenv("MEGAXATL_KERNELS", "naive")
    monkeypatch.setenv("MEGAXATL_KERNEL_SELECTIVE_SCAN", "torch")
    assert dispatch.backend_for("selective_scan", "cpu") == "torch"
    assert dispatch.backend_for("ssd_scan", "cpu") == "naive"


def test_override_routes_the_public_op(monkeypatch):
    calls = []
    real = dispatch.load

    def spy(op, name):
        calls.append((op, name))
        return real(op, name)

    monkeypatch.setattr(dispatch, "load", spy)
    monkeypatch.setenv("MEGAXATL_KERNEL_SELECTIVE_SCAN", "naive")
    kernels.selective_scan(**scan_inputs(L=4))
    assert calls == [("selective_scan", "naive")]


def test_unknown_backend_name_errors(monkeypatch):
    monkeypatch.setenv("MEGAXATL_KERNELS", "fast")
    with pytest.raises(BackendError, match="MEGAXATL_KERNELS='fast' is not a kernel backend; choose one of"):
        dispatch.backend_for("selective_scan", "cpu")


def test_per_op_backend_the_op_lacks_errors(monkeypatch):
    monkeypatch.setenv("MEGAXATL_KERNEL_SSD_STATE_UPDATE", "triton")
    with pytest.raises(BackendError, match="has no 'triton' backend"):
        dispatch.backend_for("ssd_state_update", "cpu")


def test_global_backend_an_op_lacks_keeps_its_default(monkeypatch):
    monkeypatch.setenv("MEGAXATL_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.backend_for("selective_state_update", "cpu") == "cpu"
    assert dispatch.backend_for("selective_scan", "cpu") == "triton"


def test_unavailable_backend_errors_in_strict_mode_and_warns_otherwise(monkeypatch):
    monkeypatch.setenv("MEGAXATL_KERNELS_STRICT", "1")
    monkeypatch.setenv("MEGAXATL_KERNELS", "cuda")
    with pytest.raises(BackendError, match="cannot run on cpu"):
        dispatch.backend_for("selective_scan", torch.zeros(1))
    monkeypatch.setenv("MEGAXATL_KERNELS", "triton")  # CPU tensors need the interpreter
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        dispatch.backend_for("causal_conv1d", "cpu")
    monkeypatch.setenv("MEGAXATL_KERNELS_STRICT", "0")
    with pytest.warns(UserWarning, match="not the requested 'triton'.*TRITON_INTERPRET=1"):
        assert dispatch.backend_for("causal_conv1d", "cpu") == "cpu"
    assert dispatch.choose("causal_conv1d", "cpu").reason is not None


def test_unknown_op_errors():
    with pytest.raises(BackendError, match="unknown kernel op"):
        dispatch.backend_for("flash_attention", "cpu")


def test_describe_backends():
    info = kernels.describe_backends()
    assert set(info) == set(OPS)
    for op, row in info.items():
        assert row["chosen_cpu"] == "cpu"
        assert isinstance(row["chosen_cuda"], str)
        assert {"torch", "cpu"} <= set(row["available"])
        assert ("naive" in row["available"]) == ("naive" in dispatch._backends(op))
        assert "cuda" in row["unavailable"] or "cuda" in row["available"] or "cuda" not in dispatch._backends(op)


def test_cpp_build_failure_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(scan_cpu, "_LIB", None)
    monkeypatch.setattr(scan_cpu, "_ERROR", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    dispatch._forget()  # the automatic choice is cached per process
    with pytest.warns(UserWarning, match="C\\+\\+ selective scan unavailable"):
        assert dispatch.backend_for("selective_scan", "cpu") == "torch"
    monkeypatch.setenv("MEGAXATL_KERNELS", "cpu")
    monkeypatch.setenv("MEGAXATL_KERNELS_STRICT", "1")
    with pytest.raises(BackendError, match="C\\+\\+ compiler"):
        dispatch.backend_for("selective_scan", "cpu")


def test_public_ops_are_functions_after_backends_load():
    """A subpackage named like an op would rebind that name on megaxatl.kernels when imported."""
    for op in OPS:
        for b in dispatch.REGISTRY[op]:
            if b.name != "triton":
                dispatch.load(op, b.name)
        assert callable(getattr(kernels, op)) and not isinstance(getattr(kernels, op), type(kernels)), op
