"""Build a torch-free C++ source into a cached shared library at first use and load it with ctypes.

Why not `torch.utils.cpp_extension.load_inline`: it always includes <torch/extension.h>, which
takes ~48 s to compile on a 2-core machine (measured; ~9.5 s with minimal ATen headers and a
TORCH_LIBRARY op). Our kernels only need raw fp32 pointers, so a header-free source compiles in
~1 s, and the Python side does every check. The cache lives under TORCH_EXTENSIONS_DIR (torch's
default build root otherwise), keyed by a hash of source, flags, compiler and CPU flags (the
build uses -march=native, so a cache shared between different CPUs must not mix binaries).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
NATIVE = ["-march=native"]


class BuildError(RuntimeError):
    pass


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return "unknown-cpu"


def _build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / "megaxatl_kernels"


def _compile(cxx: str, src: Path, out: Path, flags: list[str]) -> None:
    cmd = [cxx, *flags, str(src), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-400:]}")


def build_and_load(name: str, source: Path) -> ctypes.CDLL:
    """Compile `source` (once per content/flags/CPU) and return the loaded library.

    Raises BuildError when no compiler is found or compilation fails."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise BuildError("no C++ compiler found (set CXX)")
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join([cxx, *FLAGS, *NATIVE, _cpu_signature()]).encode()).hexdigest()[:16]
    root = _build_root()
    root.mkdir(parents=True, exist_ok=True)
    lib = root / f"{name}_{key}.so"
    if not lib.exists():
        # build into a temp file then rename: concurrent processes never load a half-written .so
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
        os.close(fd)
        try:
            try:
                _compile(cxx, source, Path(tmp), FLAGS + NATIVE)
            except BuildError:
                _compile(cxx, source, Path(tmp), FLAGS)  # a compiler without -march=native
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(lib))
