"""Backend registry and selection: op -> backends, what each needs, which one runs, and why.

Backends (names are global across ops):
  naive   the pure-PyTorch sequential reference (naive.py), always available
  torch   a fast pure-PyTorch path (chunked), runs on any device
  cpu     the fastest CPU path (C++ core for the selective scan; for ops whose best CPU path is
          already plain PyTorch, `cpu` is that same function)
  triton  our Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (tests only;
          never picked automatically on CPU)
  cuda    the external GPU libraries: mamba-ssm, causal-conv1d, flash-linear-attention (fla), on
          CUDA tensors, when the functions called and their compiled modules load (probes.py)

Which backend runs an op (policy.py holds the request): the requested backend when it can run
on the tensor's device, else (strict off) the automatic choice with one warning naming the reason,
or (strict on) a BackendError. The automatic choice is the first backend in ORDER for the device
type that can run and is `auto` (our Triton GLA kernel is a reference path: by request only).
Every call is counted per (op, backend) (`used()`), including the fallbacks a backend takes
inside itself for features its library lacks (`fallback()`), so a run can report what ran.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from . import policy, probes
from .policy import BACKENDS, BackendError

# automatic order per device type; triton on CPU is the (slow) interpreter, so only on request
ORDER = {"cpu": ("cpu", "torch", "naive"), "cuda": ("cuda", "triton", "torch", "naive")}

__all__ = ["BACKENDS", "BackendError", "ORDER", "REGISTRY", "backend_for", "choose", "contract_of",
           "describe_backends", "fallback", "get_impl", "load", "startup_report", "used"]


def _triton_runs(device_type: str) -> bool:
    if device_type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return device_type == "cuda"


def _cpu_ext_runs(device_type: str) -> bool:
    if device_type != "cpu":
        return False
    from .selective import cpu as scan_cpu

    return scan_cpu.available()


_ANY = lambda device_type: True  # noqa: E731
_CPU_ONLY = lambda device_type: device_type == "cpu"  # noqa: E731
_CUDA_ONLY = lambda device_type: device_type == "cuda"  # noqa: E731

_DEVICE_NEEDS = {"cuda": "CUDA tensors", "triton": "CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors",
                 "cpu": "CPU tensors and a C++ compiler for the selective-scan core"}


@dataclass(frozen=True)
class Backend:
    name: str
    target: str  # "module:function", relative to this package, imported on first use
    runs_on: Callable[[str], bool]  # device type -> whether this backend can take such tensors
    needs: tuple[str, ...] = ()  # probes.probe requirements: the external functions it calls
    auto: bool = True  # False: runs only when requested (a reference path)
    # "module:function" checking the arguments exactly as the external kernel will (layouts,
    # strides, dtypes) without calling it: the cuda backend runs it before every kernel call, and
    # tests run it on CPU (testing.cuda_contracts) so a layout the kernel rejects fails there too
    contract: str | None = None

    def problem(self, device_type: str) -> str | None:
        """None when this backend can run on `device_type` here, else why not (what it calls does
        not load, before the device: that is what an install needs to fix)."""
        missing = probes.first_problem(self.needs)
        if missing is not None:
            return missing
        if not self.runs_on(device_type):
            return f"needs {_DEVICE_NEEDS.get(self.name, 'another device')}, got {device_type}"
        return None


def _b(name, target, runs_on=_ANY, needs=(), auto=True, contract=None):
    return Backend(name, target, runs_on, tuple(needs), auto, contract)


_TRITON = dict(runs_on=_triton_runs, needs=probes.TRITON)

# op -> its backends. Order inside a list does not matter: ORDER decides the automatic choice.
REGISTRY: dict[str, list[Backend]] = {
    "selective_scan": [
        _b("naive", "selective.naive:selective_scan"),
        _b("torch", "selective.chunked:selective_scan"),
        _b("cpu", "selective.cpu:selective_scan", _cpu_ext_runs),
        _b("triton", "selective.triton_scan:selective_scan", **_TRITON),
        _b("cuda", "selective.cuda:selective_scan", _CUDA_ONLY, probes.MAMBA_SCAN,
           contract="selective.cuda:prepare_selective_scan"),
    ],
    # conv + x_proj + dt_proj + scan + out_proj of a Mamba-1 mixer in one call (training, TP 1):
    # `torch` composes the dispatched ops above; `cuda` is mamba-ssm's fused mamba_inner_fn
    "mamba_inner": [
        _b("torch", "selective.inner:mamba_inner"),
        _b("cpu", "selective.inner:mamba_inner", _CPU_ONLY),
        _b("cuda", "selective.inner:mamba_inner_cuda", _CUDA_ONLY, probes.MAMBA_INNER,
           contract="selective.inner:prepare_mamba_inner"),
    ],
    # one decode step is a handful of elementwise ops: the reference *is* the fast CPU/torch path
    "selective_state_update": [
        _b("naive", "selective.naive:selective_state_update"),
        _b("torch", "selective.naive:selective_state_update"),
        _b("cpu", "selective.naive:selective_state_update", _CPU_ONLY),
        _b("cuda", "selective.cuda:selective_state_update", _CUDA_ONLY, probes.MAMBA_STATE_UPDATE),
    ],
    "ssd_scan": [
        _b("naive", "ssd.naive:ssd_scan"),
        _b("torch", "ssd.chunked:ssd_scan"),
        _b("cpu", "ssd.chunked:ssd_scan", _CPU_ONLY),  # the chunked matmul form is the fast CPU path
        _b("triton", "ssd.triton_ssd:ssd_scan", **_TRITON),
        _b("cuda", "ssd.cuda:ssd_scan", _CUDA_ONLY, probes.MAMBA_SSD, contract="ssd.cuda:prepare_ssd_scan"),
    ],
    "ssd_state_update": [
        _b("naive", "ssd.naive:ssd_state_update"),
        _b("torch", "ssd.naive:ssd_state_update"),
        _b("cpu", "ssd.naive:ssd_state_update", _CPU_ONLY),
        _b("cuda", "ssd.cuda:ssd_state_update", _CUDA_ONLY, probes.MAMBA_STATE_UPDATE),
    ],
    "causal_conv1d": [
        _b("naive", "conv1d.naive:causal_conv1d"),
        _b("torch", "conv1d.torch_conv:causal_conv1d"),
        _b("cpu", "conv1d.torch_conv:causal_conv1d", _CPU_ONLY),  # F.conv1d(groups=d) is the fast path
        _b("triton", "conv1d.triton_conv:causal_conv1d", **_TRITON),
        _b("cuda", "conv1d.cuda:causal_conv1d", _CUDA_ONLY, probes.CAUSAL_CONV1D,
           contract="conv1d.cuda:prepare_causal_conv1d"),
    ],
    "causal_conv1d_update": [
        _b("naive", "conv1d.naive:causal_conv1d_update"),
        _b("torch", "conv1d.naive:causal_conv1d_update"),
        _b("cpu", "conv1d.naive:causal_conv1d_update", _CPU_ONLY),
        _b("cuda", "conv1d.cuda:causal_conv1d_update", _CUDA_ONLY, probes.CAUSAL_CONV1D_UPDATE),
    ],
    # gated linear attention (GLA, retention): chunked matmul form is the fast CPU path; `cuda` is
    # flash-linear-attention's chunked kernels; our Triton kernel is a reference (not automatic)
    "gla_scan": [
        _b("naive", "gla.naive:gla_recurrent"),
        _b("torch", "gla.chunked:gla_chunk"),
        _b("cpu", "gla.chunked:gla_chunk", _CPU_ONLY),
        _b("triton", "gla.triton_gla:gla_chunk", auto=False, **_TRITON),
        _b("cuda", "gla.fla:gla_scan", _CUDA_ONLY, probes.FLA_SCAN, contract="gla.fla:prepare_gla_scan"),
    ],
    "gla_state_update": [
        _b("naive", "gla.naive:gla_state_update"),
        _b("torch", "gla.naive:gla_state_update"),
        _b("cpu", "gla.naive:gla_state_update", _CPU_ONLY),
        _b("cuda", "gla.fla:gla_state_update", _CUDA_ONLY, probes.FLA_STEP),
    ],
}


def _backends(op: str) -> dict[str, Backend]:
    if op not in REGISTRY:
        raise BackendError(f"unknown kernel op {op!r}; known: {', '.join(REGISTRY)}")
    return {b.name: b for b in REGISTRY[op]}


def _device_type(x: torch.Tensor | torch.device | str) -> str:
    if isinstance(x, torch.Tensor):
        return x.device.type
    return torch.device(x).type


@dataclass(frozen=True)
class Choice:
    """What runs `op` on a device: `backend`; `requested` (None: automatic) and where the request
    came from; `reason`: why the requested backend does not run (then `backend` is the fallback)."""

    op: str
    device: str
    backend: str
    requested: str | None = None
    source: str | None = None
    reason: str | None = None

    def describe(self) -> str:
        if self.reason is None:
            return self.backend
        return f"{self.backend} (requested {self.requested} by {self.source}: {self.reason})"


def _automatic(op: str, backends: dict[str, Backend], dev: str) -> str:
    for name in ORDER.get(dev, ("torch", "naive")):
        b = backends.get(name)
        if b is not None and b.auto and b.problem(dev) is None:
            return name
    raise BackendError(f"no kernel backend for {op!r} on {dev}")  # unreachable: naive / torch run anywhere


_CHOICES: dict[tuple, Choice] = {}
_WARNED: set[tuple] = set()


def choose(op: str, tensor: torch.Tensor | torch.device | str) -> Choice:
    """The Choice for `op` on this tensor's (or device's) type; BackendError in strict mode when
    the requested backend cannot run, else a warning (once) and the automatic choice."""
    backends, dev = _backends(op), _device_type(tensor)
    req = policy.request(op, tuple(backends))
    key = (op, dev, req, os.environ.get("TRITON_INTERPRET"))  # the interpreter decides triton on CPU
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    name, source, strict = req
    if name is None:
        choice = Choice(op, dev, _automatic(op, backends, dev))
    else:
        why = backends[name].problem(dev)
        if why is None:
            choice = Choice(op, dev, name, name, source)
        elif strict:
            raise BackendError(f"kernel backend {name!r} for {op!r} (requested by {source}, strict) cannot run "
                               f"on {dev} here: {why}")
        else:
            choice = Choice(op, dev, _automatic(op, backends, dev), name, source, why)
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"megaxatl.kernels: {op} on {dev} uses {choice.backend!r}, not the requested "
                              f"{name!r} ({source}): {why}", stacklevel=3)
    _CHOICES[key] = choice
    return choice


def backend_for(op: str, tensor: torch.Tensor | torch.device | str) -> str:
    """Name of the backend that runs `op` for a tensor (or device) here."""
    return choose(op, tensor).backend


def load(op: str, name: str) -> Callable:
    """Import and return backend `name`'s implementation of `op`."""
    module, fn = _backends(op)[name].target.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), fn)


_USED: Counter = Counter()  # (op, backend) -> calls


# testing.cuda_contracts: (op, impl) -> impl that first checks the arguments as the op's `cuda`
# backend's external kernel would (None: calls go straight to the implementation)
_CONTRACT_HOOK: Callable[[str, Callable], Callable] | None = None


def get_impl(op: str, tensor: torch.Tensor) -> Callable:
    """The implementation that runs `op` on `tensor` (counted in `used()`)."""
    name = backend_for(op, tensor)
    _USED[(op, name)] += 1
    impl = load(op, name)
    return impl if _CONTRACT_HOOK is None else _CONTRACT_HOOK(op, impl)


def contract_of(op: str) -> Callable | None:
    """The `prepare_*` function of op's `cuda` backend (its external kernel's argument checks,
    taking the op's arguments plus `device_checks`), or None when it has none."""
    b = _backends(op).get("cuda")
    if b is None or b.contract is None:
        return None
    module, fn = b.contract.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), fn)


def fallback(op: str, name: str) -> Callable:
    """Backend `name` of `op`, called by another backend for a case its library does not cover
    (e.g. causal-conv1d with a conv state); counted in `used()` like a dispatched call."""
    _USED[(op, name)] += 1
    return load(op, name)


def used(reset: bool = False) -> dict[str, dict[str, int]]:
    """{op: {backend: calls}} since the start (or the last reset)."""
    out: dict[str, dict[str, int]] = {}
    for (op, name), n in sorted(_USED.items()):
        out.setdefault(op, {})[name] = n
    if reset:
        _USED.clear()
    return out


def _forget() -> None:
    """Drop cached choices (policy.configure calls this; so do tests that change the environment)."""
    _CHOICES.clear()
    _WARNED.clear()


policy.on_change(_forget)


def startup_report(device: torch.device | str, ops=None) -> dict[str, Choice]:
    """{op: Choice} on `device` for every op (or `ops`): what a run start records. In strict mode a
    requested backend that cannot run raises one BackendError naming every such op."""
    errors, out = [], {}
    for op in ops or REGISTRY:
        try:
            out[op] = choose(op, device)
        except BackendError as e:
            errors.append(str(e))
    if errors:
        raise BackendError("; ".join(errors))
    return out


def describe_backends() -> dict[str, dict]:
    """{op: {"chosen_cpu", "chosen_cuda" (or "-"), "available": [usable here], "unavailable":
    {name: why}}} for `megaxatl info`; a choice that is a fallback or an error says so."""
    out = {}
    has_cuda = torch.cuda.is_available()
    devs = ["cpu"] + (["cuda"] if has_cuda else [])
    for op, backends in REGISTRY.items():
        avail, missing = [], {}
        for b in backends:
            problems = [b.problem(d) for d in devs]
            if any(p is None for p in problems):
                avail.append(b.name)
            else:
                missing[b.name] = problems[-1]
        row = {"available": avail, "unavailable": missing}
        for dev in ("cpu", "cuda"):
            if dev not in devs:
                row[f"chosen_{dev}"] = "-"
                continue
            try:
                row[f"chosen_{dev}"] = choose(op, dev).describe()
            except BackendError as e:
                row[f"chosen_{dev}"] = f"error: {e}"
        out[op] = row
    return out
