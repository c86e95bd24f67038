"""`megaxatl generate --ckpt DIR --prompt TEXT`: streamed recurrent decoding from a model folder."""

from __future__ import annotations

import sys
from pathlib import Path


def add_generate_args(p) -> None:
    p.add_argument("--ckpt", required=True, help="weights: a model folder (transfer output, final/), a sharded folder, "
                                                 "a training checkpoint or a run's checkpoints/ folder (its latest)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's tokenizer/)")


def load_tokenizer(ckpt: Path, override: str | None, own: Path | None = None):
    """--tokenizer, else the weights folder's own (its tokenizer/, or the one a training run used)."""
    from transformers import AutoTokenizer

    path = Path(override) if override else own if own is not None else ckpt / "tokenizer"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no tokenizer folder (pass --tokenizer)")
    return AutoTokenizer.from_pretrained(str(path))


def run_generate(args) -> int:
    import torch

    from megaxatl.checkpoint import open_model
    from megaxatl.models.generation import stream

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    ckpt = Path(args.ckpt)
    model, cfg, _, own_tok = open_model(ckpt)
    model = model.float().eval()
    tok = load_tokenizer(ckpt, args.tokenizer, own_tok)
    prompts = [tok(p).input_ids for p in args.prompt]
    eos = tok.eos_token_id
    outs: list[list[int]] = [[] for _ in prompts]
    shown = ""
    if len(prompts) == 1:
        sys.stdout.write(args.prompt[0])
    with torch.no_grad():
        for step in stream(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, eos_token_id=eos, seed=args.seed):
            for b, t in enumerate(step):
                if t is not None and t != eos:
                    outs[b].append(t)
            if len(prompts) == 1:  # stream one prompt as it decodes (decode whole, print the new tail)
                text = tok.decode(outs[0])
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    if len(prompts) > 1:
        for p, o in zip(args.prompt, outs):
            print(f"{p}{tok.decode(o)}")
    else:
        print()
    return 0
