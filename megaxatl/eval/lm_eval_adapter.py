"""An lm-evaluation-harness model adapter: `--model megaxatl --model_args ckpt=DIR`.

Importing this module registers the model class under the name ``megaxatl`` (lm-eval's
`register_model`). lm-eval 0.4.x does not discover plugins through entry points, so either run the
harness through this module, which registers the adapter and then hands its arguments to lm-eval's
own command line unchanged:

    python -m megaxatl.eval.lm_eval_adapter --model megaxatl --model_args ckpt=runs/x/final \\
        --tasks lambada_openai,hellaswag --batch_size 8

or, from Python, ``import megaxatl.eval.lm_eval_adapter`` before ``lm_eval.simple_evaluate(
model="megaxatl", model_args="ckpt=...")``.

Model args: ckpt (model folder, required), tokenizer (default DIR/tokenizer), batch_size (int;
"auto" means 1), max_length (default the config's max_seq_len), device (default cpu), dtype
(float32 | bfloat16 | float16; default float32).

Conventions: text is encoded without special tokens (as prepare-data does) and the EOS token is the
prefix of an empty context and of every rolling window, matching the training stream where each
document follows an EOS. Batches of continuations are right-padded; every mixer is causal, so
padding never reaches a scored position.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import lm_eval.models  # noqa: F401  (the built-in models first: lm-eval only loads them into an empty registry)
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("megaxatl")
class MegaxatlLM(TemplateLM):
    def __init__(self, ckpt: str, tokenizer: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, max_length: int | None = None, device: str | None = None,
                 dtype: str = "float32", seed: int = 1234, **kwargs):
        super().__init__()
        from megaxatl.checkpoint import open_model
        from megaxatl.eval.generate_cli import load_tokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's default --device is cuda; on a CPU machine run on the CPU
        self._device = torch.device(device or "cpu")
        model, cfg, _, own_tok = open_model(Path(ckpt))
        self.model = model.to(self._device, _DTYPES[dtype]).eval()
        self.cfg = cfg
        self.tokenizer = load_tokenizer(Path(ckpt), tokenizer, own_tok)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"{ckpt}: the tokenizer defines no EOS token")
        bs = str(batch_size)
        self.batch_size = int(bs) if bs.isdigit() else 1  # "auto" / "auto:N": one at a time
        self.max_length = int(max_length) if max_length else int(cfg.model.max_seq_len)
        self.seed = int(seed)

    # -- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring
    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context tokens, continuation tokens) -> (sum log p(continuation | context), greedy?).
        Longest first, batch_size rows at a time, right-padded; inputs keep the last max_length
        tokens of context + continuation."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            inps, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    raise ValueError("empty continuation")
                inps.append((ctx + cont)[-(self.max_length + 1):][:-1])
                conts.append(cont)
            width = max(len(x) for x in inps)
            batch = torch.full((len(idx), width), self.eot_token_id, dtype=torch.long)
            for r, x in enumerate(inps):
                batch[r, :len(x)] = torch.tensor(x)
            logp = F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1)
            for r, i in enumerate(idx):
                n, c = len(inps[r]), conts[r]
                rows = logp[r, n - len(c):n]
                target = torch.tensor(c, device=rows.device)
                ll = float(rows.gather(-1, target[:, None]).sum())
                out[i] = (ll, bool((rows.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        res = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), ans in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (string,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self.score_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # -- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megaxatl.models.generation import stream

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for idx_all in groups.values():
            kw = dict(requests[idx_all[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            top_k, top_p = int(kw.pop("top_k", 0) or 0), float(kw.pop("top_p", 1.0) or 1.0)
            for start in range(0, len(idx_all), self.batch_size):
                idx = idx_all[start:start + self.batch_size]
                prompts = []
                for i in idx:
                    ids = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                    prompts.append(ids[-max(1, self.max_length - max_new):])
                toks: list[list[int]] = [[] for _ in idx]
                stopped = [False] * len(idx)
                for step in stream(self.model, prompts, max_new, temperature=temperature, top_k=top_k,
                                   top_p=top_p, eos_token_id=self.eot_token_id, seed=self.seed):
                    for r, t in enumerate(step):
                        if t is None or stopped[r]:
                            continue
                        if t == self.eot_token_id:
                            stopped[r] = True
                            continue
                        toks[r].append(t)
                        if until and any(u in self.tok_decode(toks[r]) for u in until):
                            stopped[r] = True
                        elif len(toks[r]) >= max_new:
                            stopped[r] = True
                    if all(stopped):
                        break
                for r, i in enumerate(idx):
                    text = self.tok_decode(toks[r])
                    for u in until:
                        text = text.split(u)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        bar.close()
        return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with the `megaxatl` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
