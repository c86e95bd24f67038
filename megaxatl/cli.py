"""The `megaxatl` console script: one subcommand per operator task.

Every subcommand prints one clear line on bad input and exits non-zero with a code from the one
table in megaxatl/exitcodes.py (no traceback unless MEGAXATL_DEBUG=1: an unexpected error's goes
to a file the line names), and none writes a partial output in place of a good one.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from megaxatl import exitcodes

# name -> (module, add-arguments function, run function, help). Modules are imported lazily so
# `megaxatl info` stays fast and a broken optional dependency only affects its own command.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "info": ("megaxatl.info", "add_info_args", "run_info",
             "versions, usable backends, kernel choices and config sizes"),
    "transfer": ("megaxatl.transfer.cli", "add_transfer_args", "run_transfer",
                 "copy a donor transformer's shared components into an LCI model (XATL)"),
    "select-layers": ("megaxatl.transfer.select_cli", "add_select_args", "run_select",
                      "measure each donor attention layer's cost on text; choose the layers a hybrid keeps"),
    "demo": ("megaxatl.demo", "add_demo_args", "run_demo",
             "XATL vs scratch on a real donor and real text, a few minutes on CPU"),
    "prepare-data": ("megaxatl.data.cli", "add_prepare_data_args", "run_prepare_data",
                     "tokenize and pack text into webdataset shards with a manifest"),
    "eval": ("megaxatl.eval.eval_cli", "add_eval_args", "run_eval",
             "loss, perplexity and bits per byte of a model folder on held-out data"),
    "generate": ("megaxatl.eval.generate_cli", "add_generate_args", "run_generate",
                 "generate text from a model folder with recurrent decoding"),
    "reshard": ("megaxatl.checkpoint.reshard", "add_reshard_args", "run_reshard",
                "rewrite model weights at another TP x PP layout (sharded) or as one model folder"),
    "plan": ("megaxatl.cluster.plan", "add_plan_args", "run_plan",
             "per-GPU memory and step time of each TP x PP x DP x ZeRO layout that fits"),
    "export-hf": ("megaxatl.export.cli", "add_export_hf_args", "run_export_hf",
                  "write a model folder as a Hugging Face folder (stock class when one matches exactly)"),
    "import-hf": ("megaxatl.export.cli", "add_import_hf_args", "run_import_hf",
                  "read a Hugging Face folder written by export-hf back into a model folder"),
}


class CLIError(Exception):
    """An operator error: printed as one line, exit code 2."""

    exit_code = exitcodes.BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaxatl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, add_args, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        getattr(import_module(module), add_args)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, run, _ = COMMANDS[args.command]
    try:
        return int(getattr(import_module(module), run)(args) or 0)
    except (Exception, KeyboardInterrupt) as e:  # one line for the operator (exitcodes.py)
        return exitcodes.report(f"megaxatl {args.command}", e)


if __name__ == "__main__":
    sys.exit(main())
