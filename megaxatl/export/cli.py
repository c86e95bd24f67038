"""`megaxatl export-hf --model DIR --out DIR` and `megaxatl import-hf --hf DIR --out DIR`."""

from __future__ import annotations

from pathlib import Path

# hf.ARCH_NAMES, repeated here so that building the parser does not import torch
ARCH_CHOICES = ("auto", "llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                "stablelm", "gpt_neox", "gpt2", "mamba", "mamba2", "bamba", "remote")


def _refuse_existing(out: Path, overwrite: bool) -> None:
    # checked before any work so that the operator hears it at once
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")


def add_export_hf_args(p) -> None:
    p.add_argument("--model", required=True, help="a megaxatl model folder (transfer output or exported checkpoint)")
    p.add_argument("--out", required=True, help="output Hugging Face folder (must not exist unless --overwrite)")
    p.add_argument("--arch", choices=ARCH_CHOICES, default="auto",
                   help="target class: auto picks the first stock class that reproduces the model exactly, "
                        "else 'remote' (shipped model code, trust_remote_code=True)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")


def run_export_hf(args) -> int:
    from megaxatl.export.hf import export_hf

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    arch = export_hf(args.model, out, overwrite=args.overwrite, arch=args.arch)
    how = "trust_remote_code=True" if arch.remote else "stock transformers"
    print(f"wrote {out} ({arch.hf_class}, {how})")
    return 0


def add_import_hf_args(p) -> None:
    p.add_argument("--hf", required=True, help="a Hugging Face folder written by export-hf "
                                               "(or a stock folder of a donor family megaxatl reads)")
    p.add_argument("--out", required=True, help="output megaxatl model folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")


def run_import_hf(args) -> int:
    from megaxatl.export.hf import import_hf

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    source = import_hf(args.hf, out, overwrite=args.overwrite)
    print(f"wrote {out} (model.safetensors, meta.json) from {source}")
    return 0
