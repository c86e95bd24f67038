"""Backend registry: op -> ordered backends, availability checks, env overrides.

Backends (names are global across ops):
  naive   the pure-PyTorch sequential reference (naive.py), always available
  torch   a fast pure-PyTorch path (chunked), runs on any device
  cpu     the fastest CPU path (C++ core for the selective scan; for ops whose best CPU path is
          already plain PyTorch, `cpu` is that same function)
  triton  Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (tests only; never
          picked automatically on CPU)
  cuda    mamba-ssm / causal-conv1d CUDA kernels when importable and the tensor is on CUDA

Selection for a tensor: MEGAXATL_KERNEL_<OP> (e.g. MEGAXATL_KERNEL_SELECTIVE_SCAN=torch), else
MEGAXATL_KERNELS, else the first available backend in the op's order for that device type.
An unknown name is an error; so is a requested backend that cannot run on this tensor. A global
MEGAXATL_KERNELS naming a backend an op does not implement at all (e.g. `triton` for the decode
steps) leaves that op on its default; the per-op variable is strict.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

BACKENDS = ("naive", "torch", "cpu", "triton", "cuda")
# automatic order per device type; triton on CPU is the (slow) interpreter, so only on request
ORDER = {"cpu": ("cpu", "torch", "naive"), "cuda": ("cuda", "triton", "torch", "naive")}


class BackendError(RuntimeError):
    """A requested kernel backend is unknown or cannot run here."""


def _has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # a broken CUDA extension raises more than ImportError
        return False


@lru_cache(maxsize=None)
def _module_ok(name: str) -> bool:
    return _has_module(name)


def _triton_ok(device_type: str) -> bool:
    if not _module_ok("triton"):
        return False
    if device_type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return device_type == "cuda"


def _cpu_ext_ok(device_type: str) -> bool:
    if device_type != "cpu":
        return False
    from .selective import cpu as scan_cpu

    return scan_cpu.available()


_ANY = lambda device_type: True  # noqa: E731
_CPU_ONLY = lambda device_type: device_type == "cpu"  # noqa: E731


def _cuda_with(module: str) -> Callable[[str], bool]:
    return lambda device_type: device_type == "cuda" and _module_ok(module)


@dataclass(frozen=True)
class Backend:
    name: str
    target: str  # "module:function", relative to this package, imported on first use
    available: Callable[[str], bool]  # device type -> can run


def _b(name, target, available):
    return Backend(name, target, available)


# op -> its backends. Order inside a list does not matter: ORDER decides the automatic choice.
REGISTRY: dict[str, list[Backend]] = {
    "selective_scan": [
        _b("naive", "selective.naive:selective_scan", _ANY),
        _b("torch", "selective.chunked:selective_scan", _ANY),
        _b("cpu", "selective.cpu:selective_scan", _cpu_ext_ok),
        _b("triton", "selective.triton_scan:selective_scan", _triton_ok),
        _b("cuda", "selective.cuda:selective_scan", _cuda_with("mamba_ssm")),
    ],
    # one decode step is a handful of elementwise ops: the reference *is* the fast CPU/torch path
    "selective_state_update": [
        _b("naive", "selective.naive:selective_state_update", _ANY),
        _b("torch", "selective.naive:selective_state_update", _ANY),
        _b("cpu", "selective.naive:selective_state_update", _CPU_ONLY),
        _b("cuda", "selective.cuda:selective_state_update", _cuda_with("mamba_ssm")),
    ],
    "ssd_scan": [
        _b("naive", "ssd.naive:ssd_scan", _ANY),
        _b("torch", "ssd.chunked:ssd_scan", _ANY),
        _b("cpu", "ssd.chunked:ssd_scan", _CPU_ONLY),  # the chunked matmul form is the fast CPU path
        _b("triton", "ssd.triton_ssd:ssd_scan", _triton_ok),
        _b("cuda", "ssd.cuda:ssd_scan", _cuda_with("mamba_ssm")),
    ],
    "ssd_state_update": [
        _b("naive", "ssd.naive:ssd_state_update", _ANY),
        _b("torch", "ssd.naive:ssd_state_update", _ANY),
        _b("cpu", "ssd.naive:ssd_state_update", _CPU_ONLY),
        _b("cuda", "ssd.cuda:ssd_state_update", _cuda_with("mamba_ssm")),
    ],
    "causal_conv1d": [
        _b("naive", "conv1d.naive:causal_conv1d", _ANY),
        _b("torch", "conv1d.torch_conv:causal_conv1d", _ANY),
        _b("cpu", "conv1d.torch_conv:causal_conv1d", _CPU_ONLY),  # F.conv1d(groups=d) is the fast path
        _b("triton", "conv1d.triton_conv:causal_conv1d", _triton_ok),
        _b("cuda", "conv1d.cuda:causal_conv1d", _cuda_with("causal_conv1d")),
    ],
    # gated linear attention (GLA, retention): chunked matmul form is the fast CPU path
    "gla_scan": [
        _b("naive", "gla.naive:gla_recurrent", _ANY),
        _b("torch", "gla.chunked:gla_chunk", _ANY),
        _b("cpu", "gla.chunked:gla_chunk", _CPU_ONLY),
        _b("triton", "gla.triton_gla:gla_chunk", _triton_ok),
    ],
    "gla_state_update": [
        _b("naive", "gla.naive:gla_state_update", _ANY),
        _b("torch", "gla.naive:gla_state_update", _ANY),
        _b("cpu", "gla.naive:gla_state_update", _CPU_ONLY),
    ],
    "causal_conv1d_update": [
        _b("naive", "conv1d.naive:causal_conv1d_update", _ANY),
        _b("torch", "conv1d.naive:causal_conv1d_update", _ANY),
        _b("cpu", "conv1d.naive:causal_conv1d_update", _CPU_ONLY),
        _b("cuda", "conv1d.cuda:causal_conv1d_update", _cuda_with("causal_conv1d")),
    ],
}


def _backends(op: str) -> dict[str, Backend]:
    if op not in REGISTRY:
        raise BackendError(f"unknown kernel op {op!r}; known: {', '.join(REGISTRY)}")
    return {b.name: b for b in REGISTRY[op]}


def requested_backend(op: str) -> str | None:
    """The backend named by the environment for `op`, or None (validated, see module docstring)."""
    per_op_var = f"MEGAXATL_KERNEL_{op.upper()}"
    for var in (per_op_var, "MEGAXATL_KERNELS"):
        name = os.environ.get(var, "").strip().lower()
        if not name:
            continue
        if name not in BACKENDS:
            raise BackendError(f"{var}={name!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
        if name not in _backends(op):
            if var == per_op_var:
                raise BackendError(f"{var}={name!r}: op {op!r} has no {name!r} backend "
                                   f"(it has {', '.join(_backends(op))})")
            continue  # the global override does not apply to ops without that backend
        return name
    return None


def _device_type(x: torch.Tensor | torch.device | str) -> str:
    if isinstance(x, torch.Tensor):
        return x.device.type
    return torch.device(x).type


def backend_for(op: str, tensor: torch.Tensor | torch.device | str) -> str:
    """Name of the backend that runs `op` for a tensor (or device) here."""
    backends, dev = _backends(op), _device_type(tensor)
    name = requested_backend(op)
    if name is not None:
        if not backends[name].available(dev):
            raise BackendError(f"kernel backend {name!r} for {op!r} cannot run on {dev} here "
                               f"({_why_unavailable(name, dev)})")
        return name
    for name in ORDER.get(dev, ("torch", "naive")):
        if name in backends and backends[name].available(dev):
            return name
    raise BackendError(f"no kernel backend for {op!r} on {dev}")  # unreachable: naive runs anywhere


def _why_unavailable(name: str, dev: str) -> str:
    if name == "cuda":
        return "needs CUDA tensors and mamba-ssm / causal-conv1d installed"
    if name == "triton":
        return "needs triton and CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
    if name == "cpu":
        return "needs CPU tensors and a C++ compiler for the selective-scan core"
    return "not supported on this device"


def load(op: str, name: str) -> Callable:
    """Import and return backend `name`'s implementation of `op`."""
    module, fn = _backends(op)[name].target.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), fn)


def get_impl(op: str, tensor: torch.Tensor) -> Callable:
    return load(op, backend_for(op, tensor))


def describe_backends() -> dict[str, dict]:
    """{op: {"chosen_cpu": name, "chosen_cuda": name or "-", "available": [names usable here]}}."""
    out = {}
    has_cuda = torch.cuda.is_available()
    for op, backends in REGISTRY.items():
        devs = ["cpu"] + (["cuda"] if has_cuda else [])
        avail = [b.name for b in backends if any(b.available(d) for d in devs)]
        row = {"available": avail}
        for dev in ("cpu", "cuda"):
            try:
                row[f"chosen_{dev}"] = backend_for(op, dev) if dev in devs else "-"
            except BackendError as e:
                row[f"chosen_{dev}"] = f"error: {e}"
        out[op] = row
    return out
