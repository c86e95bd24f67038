"""`megaxatl transfer --donor DIR --config CFG.json --out DIR`: write an initial checkpoint.

The output is written one tensor at a time in the requested dtype (transfer/stream.py): by
default a sharded model folder (DCP files at --tp x --pp, shards.json with checksums, report.json)
from which each training rank reads only its own slices; `--format model-dir` writes one
model.safetensors instead."""

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
    p.add_argument("--format", choices=("sharded", "model-dir"), default="sharded",
                   help="sharded model folder (default) or a single model.safetensors")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel layout of the sharded output's files")
    p.add_argument("--pp", type=int, default=1, help="pipeline layout of the sharded output's files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.add_argument("--quiet", action="store_true", help="no report table")


def run_transfer(args) -> int:
    from megaxatl.checkpoint.reshard import WEIGHTS_OUTPUT, is_weights_output
    from megaxatl.config import load_config
    from megaxatl.fsutil import check_output
    from megaxatl.transfer.stream import transfer_to_folder

    cfg = load_config(args.config)
    donor = args.donor or cfg.transfer.donor
    if not donor:
        raise ValueError(f"{args.config}: no donor (give --donor or set transfer.donor)")
    out = Path(args.out)
    # before the (possibly long) transfer: --overwrite replaces only an earlier transfer output (a
    # model folder of either format), and never the donor or the config (or a folder holding them)
    check_output(out, inputs=[p for p in (donor, args.config) if Path(p).exists()], overwrite=args.overwrite,
                 replaceable=is_weights_output, kind=WEIGHTS_OUTPUT)
    layer_map = None
    if args.layer_map:
        try:
            layer_map = [int(x) for x in args.layer_map.split(",")]
        except ValueError:
            raise ValueError(f"--layer-map: expected comma-separated integers, got {args.layer_map!r}") from None
    if args.mode:
        cfg.transfer.mode = args.mode
    if layer_map is not None:
        cfg.transfer.layer_map = layer_map
    cfg.transfer.donor = str(donor)
    report = transfer_to_folder(donor, cfg, out, dtype=DTYPES[args.dtype], tp=args.tp, pp=args.pp,
                                fmt=args.format, overwrite=args.overwrite)
    if not args.quiet:
        print(report.table())
    files = ("DCP shards at tp=%d x pp=%d, shards.json" % (args.tp, args.pp) if args.format == "sharded"
             else "model.safetensors, meta.json")
    print(f"wrote {out} ({files}, report.json{', tokenizer/' if report.tokenizer_dir else ''})")
    return 0
