"""A training rank with a fault injected (launched by torchrun from tests; no tests here).

    torchrun ... tests/train_fault_worker.py --config C --fault nan|grad --at STEP [--micro M]

makes micro-batch M (default 0) of optimizer step STEP non-finite: its loss NaN ('nan'), or its
gradient infinite under a finite loss ('grad')."""

from __future__ import annotations

import argparse
import sys

from megaxatl.config import load_config
from megaxatl.train import TrainingDiverged, run


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--fault", choices=("nan", "grad"), required=True)
    p.add_argument("--at", type=int, nargs="+", required=True)
    p.add_argument("--micro", type=int, default=0)
    args = p.parse_args()
    hit = True if args.fault == "nan" else "grad"

    def fault(step, micro):
        return hit if step in args.at and micro == args.micro else False

    try:
        run(load_config(args.config), source=args.config, fault=fault)
    except TrainingDiverged as e:
        print(f"diverged: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
