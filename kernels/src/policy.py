"""Which backend is requested for an op, by whom, and whether a request that cannot run is fatal.

Two sources, the environment over the config (so an operator can override a config's choice
for one run without editing it):

    MEGAXATL_KERNEL_<OP>=name    one op (e.g. MEGAXATL_KERNEL_SELECTIVE_SCAN=torch)
    MEGAXATL_KERNELS=name        every op that has a backend of that name (others keep their default)
    MEGAXATL_KERNELS_STRICT=1|0  strict mode on / off
    configure(backend, strict)   the config's `kernels` section (megaxatl/config/kernels.py):
                                 `backend` one name for every op, or {op: name}; `strict`

`auto` (or nothing) means the automatic choice. An unknown name is a BackendError at once; so is a
per-op request (env or config) naming a backend that op does not have. In strict mode a requested
backend that cannot run is a BackendError (the trainer checks every op at start-up); otherwise
dispatch falls back to the automatic choice and warns once.
"""

from __future__ import annotations

import os
from typing import Callable

BACKENDS = ("naive", "torch", "cpu", "triton", "cuda")
AUTO = "auto"


class BackendError(RuntimeError):
    """A requested kernel backend is unknown or cannot run here."""


_config: dict = {"backend": AUTO, "ops": {}, "strict": False}
_listeners: list[Callable[[], None]] = []


def _unknown(name: str) -> str | None:
    """Why `name` is not a backend name (None when it is one, or auto)."""
    if name != AUTO and name not in BACKENDS:
        return f"{name!r} is not a kernel backend; choose one of {AUTO}, {', '.join(BACKENDS)}"
    return None


def _check_name(name: str, where: str) -> str:
    name = name.strip().lower()
    why = _unknown(name)
    if why is not None:
        raise BackendError(f"{where}={why}")
    return name


def problems(backend: str | dict[str, str | None]) -> list[tuple[str, str]]:
    """(key, reason) for each name in a `kernels.backend` value that cannot be requested: an
    unknown backend, an unknown op, an op without that backend. Keys are relative to `kernels`."""
    from .dispatch import REGISTRY  # op names; dispatch imports this module at load time

    if isinstance(backend, str):
        why = _unknown(backend.strip().lower())
        return [] if why is None else [("backend", why)]
    out = []
    for op, name in backend.items():
        key = f"backend.{op}"
        if op not in REGISTRY:
            out.append((key, f"unknown kernel op; known: {', '.join(REGISTRY)}"))
            continue
        if name is None:
            continue
        name = name.strip().lower()
        why = _unknown(name)
        if why is not None:
            out.append((key, why))
            continue
        have = [b.name for b in REGISTRY[op]]
        if name != AUTO and name not in have:
            out.append((key, f"op {op!r} has no {name!r} backend (it has {', '.join(have)})"))
    return out


def configure(backend: str | dict[str, str | None] = AUTO, strict: bool = False) -> None:
    """Set the config's request (replacing any earlier one): `backend` is one name for every op
    that has it, or {op: name or None}; BackendError naming the first bad entry."""
    bad = problems(backend)
    if bad:
        key, reason = bad[0]
        raise BackendError(f"kernels.{key}: {reason}")
    if isinstance(backend, str):
        _config.update(backend=backend.strip().lower(), ops={}, strict=bool(strict))
    else:
        ops = {op: name.strip().lower() for op, name in backend.items() if name is not None}
        _config.update(backend=AUTO, ops=ops, strict=bool(strict))
    changed()


def reset() -> None:
    """Back to the defaults (automatic, not strict)."""
    configure()


def on_change(fn: Callable[[], None]) -> None:
    _listeners.append(fn)


def changed() -> None:
    """Forget cached choices: call after changing MEGAXATL_KERNEL* in os.environ in-process."""
    for fn in _listeners:
        fn()


def strict() -> tuple[bool, str]:
    env = os.environ.get("MEGAXATL_KERNELS_STRICT", "").strip().lower()
    if env:
        if env not in ("0", "1", "true", "false"):
            raise BackendError(f"MEGAXATL_KERNELS_STRICT={env!r}: use 1 or 0")
        return env in ("1", "true"), "MEGAXATL_KERNELS_STRICT"
    return _config["strict"], "kernels.strict"


def request(op: str, have: tuple[str, ...]) -> tuple[str | None, str | None, bool]:
    """(requested backend or None for automatic, who asked, strict) for `op`, whose backends are
    `have`."""
    per_op = f"MEGAXATL_KERNEL_{op.upper()}"
    candidates = ((os.environ.get(per_op, ""), per_op, True),
                  (os.environ.get("MEGAXATL_KERNELS", ""), "MEGAXATL_KERNELS", False),
                  (_config["ops"].get(op, ""), f"kernels.backend.{op}", True),
                  (_config["backend"], "kernels.backend", False))
    for raw, source, specific in candidates:
        if not raw or not raw.strip():
            continue
        name = _check_name(raw, source)
        if name == AUTO:
            return None, None, strict()[0]
        if name not in have:
            if specific:
                raise BackendError(f"{source}={name!r}: op {op!r} has no {name!r} backend (it has {', '.join(have)})")
            continue  # an all-ops request does not apply to ops without that backend
        return name, source, strict()[0]
    return None, None, strict()[0]
