"""`megaxatl transfer --donor DIR --config CFG.json --out DIR`: write an initial checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_transfer_args(p) -> None:
    p.add_argument("--donor", help="donor folder / .gguf file, or a named asset (smollm2-135m); "
                                   "default: the config's transfer.donor")
    p.add_argument("--config", required=True, help="target config JSON")
    p.add_argument("--out", required=True, help="output model folder (must not exist unless --overwrite)")
    p.add_argument("--mode", help="copy mode (default: the config's transfer.mode)")
    p.add_argument("--layer-map", help="comma-separated donor layer per target layer (default: config / evenly spaced)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.add_argument("--quiet", action="store_true", help="no report table")


def run_transfer(args) -> int:
    from megaxatl.config import load_config
    from megaxatl.transfer import from_donor, write_transfer

    cfg = load_config(args.config)
    donor = args.donor or cfg.transfer.donor
    if not donor:
        raise ValueError(f"{args.config}: no donor (give --donor or set transfer.donor)")
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # fail before the (possibly long) transfer
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    layer_map = None
    if args.layer_map:
        try:
            layer_map = [int(x) for x in args.layer_map.split(",")]
        except ValueError:
            raise ValueError(f"--layer-map: expected comma-separated integers, got {args.layer_map!r}") from None
    model, report = from_donor(donor, cfg, mode=args.mode, layer_map=layer_map, dtype=DTYPES[args.dtype])
    if args.mode:
        cfg.transfer.mode = args.mode
    if layer_map is not None:
        cfg.transfer.layer_map = layer_map
    cfg.transfer.donor = str(donor)
    write_transfer(out, model, cfg, report, overwrite=args.overwrite)
    if not args.quiet:
        print(report.table())
    print(f"wrote {out} (model.safetensors, meta.json, report.json{', tokenizer/' if report.tokenizer_dir else ''})")
    return 0
