"""`megaxatl select-layers --donor D --data TEXT --keep-attention K`: the per-layer costs, the
attention layers to keep and the hybrid pattern, measured on the donor (transfer/select.py)."""

from __future__ import annotations

import json
from pathlib import Path


def add_select_args(p) -> None:
    p.add_argument("--donor", required=True, help="donor folder / .gguf file, or a named asset (smollm2-135m)")
    p.add_argument("--data", required=True, help="calibration text: a .txt file or a folder of them")
    p.add_argument("--keep-attention", required=True,
                   help="attention layers to keep: a count K, or a fraction such as 0.5 (also 'auto:K')")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length (default 256)")
    p.add_argument("--method", choices=("auto", "greedy", "exhaustive"), default="auto",
                   help="auto: every subset when C(n, K) <= 64 forwards, else greedy by single-layer cost")
    p.add_argument("--mixer", default="M", help="pattern symbol of the replaced layers (default M, Mamba)")
    p.add_argument("--json", help="also write the selection as JSON to this file (must not exist)")


def run_select(args) -> int:
    from megaxatl.transfer.donor_model import calibration_ids, donor_model
    from megaxatl.transfer.select import parse_keep, select_layers

    spec = args.keep_attention if args.keep_attention.startswith("auto:") else f"auto:{args.keep_attention}"
    if args.json and Path(args.json).exists():
        raise FileExistsError(f"{args.json} already exists")
    if args.tokens < 2 or args.seq_len < 1:
        raise ValueError("--tokens must be >= 2 and --seq-len >= 1")
    model, tok_dir, n = donor_model(args.donor)
    keep = parse_keep(spec, n)
    ids = calibration_ids(args.data, tok_dir, args.tokens, args.seq_len)
    sel = select_layers(model, ids, keep, args.method)
    print(sel.table())
    pattern = sel.pattern(args.mixer)
    print(f"pattern: {pattern}")
    if args.json:
        Path(args.json).write_text(json.dumps({**sel.to_dict(), "pattern": pattern}, indent=2) + "\n")
    return 0
