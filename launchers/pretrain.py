"""Pretraining entry point (thin: everything lives in megaxatl.train).

    python launchers/pretrain.py --config configs/tiny_hybrid.json --set train.steps=10
    deepspeed --num_gpus 2 launchers/pretrain.py --config C       (2 ranks; CPU ranks without GPUs)
    torchrun --nproc_per_node 2 launchers/pretrain.py --config C

Exit codes (the table in megaxatl/exitcodes.py, shared with the `megaxatl` commands): 0 done or
stopped with a checkpoint (preempted: rerun to resume), 1 the run diverged (non-finite losses;
checkpoints kept), 2 a bad config / input (one line naming file and key), 3 an I/O failure such as
a full disk (one line naming the path; the previous checkpoint and `latest` are intact), 4 an
unexpected error (one line; the traceback in a file it names, or on stderr with MEGAXATL_DEBUG=1).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="megaxatl pretraining (DeepSpeed)")
    p.add_argument("--config", required=True, help="JSON config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=10 (repeatable)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop with a checkpoint after this many steps in total (a rehearsed preemption)")
    # `deepspeed` passes --local_rank; torchrun sets LOCAL_RANK. Accept both spellings.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    from megaxatl import exitcodes
    from megaxatl.config import ConfigError
    from megaxatl.train.overrides import load_with_overrides

    out_dir = None
    try:
        cfg = load_with_overrides(args.config, args.overrides)
        out_dir = cfg.train.out_dir
        from megaxatl.train import run

        result = run(cfg, source=args.config, stop_after=args.stop_after)
    except ConfigError as e:
        return exitcodes.report("pretrain", e, label="config error: ")
    except (Exception, KeyboardInterrupt) as e:  # one line and the code of exitcodes.py
        return exitcodes.report("pretrain", e, traceback_dir=out_dir if out_dir and os.path.isdir(out_dir) else None)
    finally:
        _shutdown()
    if os.environ.get("RANK", "0") != "0":
        return 0
    if result.completed:
        print(f"pretrain: done at step {result.step}; weights in {result.final_dir}", file=sys.stderr)
    else:
        print(f"pretrain: stopped at step {result.step} with checkpoint {result.checkpoint}; rerun to resume",
              file=sys.stderr)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
