"""`megaxatl prepare-data`: argument wiring for `prepare_data`.

The top-level CLI adds a subparser and calls::

    add_prepare_data_args(sub.add_parser("prepare-data", help=...))
    ... return run_prepare_data(args)

Bad input prints one line (``megaxatl prepare-data: error: ...``) on stderr and returns 2, an I/O
failure (a full disk) 3, as megaxatl/exitcodes.py says; no traceback. `python -m
megaxatl.data.cli ...` runs it standalone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

PROG = "megaxatl prepare-data"


def add_prepare_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = ("Tokenize text (.txt/.md/.rst: one document per file; .jsonl: one per "
                          "line; folders of them; .gz ok) into packed webdataset shards with a "
                          "manifest.json, a held-out validation split and per-sample byte counts.")
    parser.add_argument("inputs", nargs="+", help="input files and/or folders")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="DIR|FILE.model",
                     help="local Hugging Face tokenizer folder (e.g. the donor's) or a "
                          "SentencePiece .model file")
    tok.add_argument("--train-spm", type=int, metavar="VOCAB",
                     help="train a SentencePiece BPE model of this vocab size on the inputs "
                          "(saved as OUT/tokenizer.model)")
    parser.add_argument("--seq-len", type=int, default=2048, help="model context (default 2048)")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.01,
                     help="fraction of documents held out for validation (default 0.01)")
    val.add_argument("--val-docs", type=int, help="exact number of validation documents")
    parser.add_argument("--text-field", default="text", help="jsonl field with the text")
    parser.add_argument("--txt-docs", choices=("file", "paragraph"), default="file",
                        help="plain text: one document per file (default) or per blank-line "
                             "separated paragraph")
    parser.add_argument("--shard-tokens", type=int, default=1 << 25,
                        help="about how many tokens per shard (default 2**25)")
    parser.add_argument("--num-proc", type=int, default=2, help="tokenizer processes")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the validation split")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset at --out (swapped in when complete)")
    return parser


def run_prepare_data(args: argparse.Namespace) -> int:
    from megaxatl import exitcodes
    from megaxatl.data.prepare import prepare_data

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t0 = time.time()
    try:
        m = prepare_data(args.inputs, args.out, args.tokenizer, args.seq_len,
                         val_fraction=args.val_fraction, val_docs=args.val_docs,
                         shard_tokens=args.shard_tokens, text_field=args.text_field,
                         txt_docs=args.txt_docs, train_spm=args.train_spm,
                         num_proc=args.num_proc, seed=args.seed, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written to {args.out}", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except Exception as e:  # noqa: BLE001 - one line and the code of exitcodes.py
        return exitcodes.report(PROG, e)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"{args.out}: train {tr['num_samples']} samples ({tr['num_label_tokens']} tokens, "
          f"{tr['num_docs']} docs, {len(tr['shards'])} shards), val {va['num_samples']} samples "
          f"({va['num_label_tokens']} tokens, {va['num_docs']} docs); tokenizer "
          f"{m['tokenizer']['name']} {m['tokenizer']['id']}; "
          f"{tr['bytes_per_token'] or 0:.3f} bytes/token; {time.time() - t0:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_prepare_data_args(argparse.ArgumentParser(prog=PROG))
    return run_prepare_data(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
