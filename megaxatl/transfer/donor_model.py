"""The donor as our own all-attention model: what layer selection measures and what distillation
uses as its teacher. Transferring the donor into an all-'*' pattern reproduces its logits (the
parity contract), so both work on every family the donor readers support, with no donor code."""

from __future__ import annotations

from pathlib import Path

import torch


def donor_model(donor_path: str | Path, dtype: torch.dtype = torch.float32, pad_vocab_multiple: int | None = None):
    """-> (LM in eval mode with every parameter frozen, tokenizer folder or None, donor layers).
    pad_vocab_multiple: pad the vocabulary as a student does (a TP teacher's vocab shards must
    cover the student's ranges)."""
    from megaxatl.assets.donors import resolve_donor
    from megaxatl.config import Config, config_from_dict
    from megaxatl.donors import open_donor
    from megaxatl.transfer.api import from_donor, model_dict_from_donor

    path = resolve_donor(str(donor_path))
    with open_donor(path) as d:
        spec = d.spec
    model_dict = model_dict_from_donor(spec, "*" * spec.n_layers)
    if pad_vocab_multiple is not None:
        model_dict["pad_vocab_multiple"] = pad_vocab_multiple
    cfg: Config = config_from_dict({"model": model_dict})
    model, report = from_donor(path, cfg, dtype=dtype, seed=0)
    model.eval().requires_grad_(False)
    return model, report.tokenizer_dir, spec.n_layers


def calibration_ids(text_path: str | Path, tokenizer_dir: str | Path | None, n_tokens: int, seq_len: int
                    ) -> torch.Tensor:
    """The first `n_tokens` (rounded down to whole sequences of `seq_len` + 1) of a text file or a
    folder of .txt files, tokenized with the donor's tokenizer -> (N, seq_len + 1) int64."""
    import os

    text_path = Path(text_path)
    if tokenizer_dir is None:
        raise ValueError("the donor has no tokenizer files, so calibration text cannot be tokenized")
    if text_path.is_dir():
        files = sorted(text_path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{text_path}: no .txt files for calibration")
        text = "\n\n".join(f.read_text(errors="replace") for f in files)
    elif text_path.is_file():
        text = text_path.read_text(errors="replace")
    else:
        raise FileNotFoundError(f"{text_path}: calibration text not found")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    per = seq_len + 1
    n_seq = min(len(ids), n_tokens) // per
    if n_seq < 1:
        raise ValueError(f"{text_path}: {len(ids)} tokens, fewer than one calibration sequence of {per}")
    return torch.tensor(ids[: n_seq * per], dtype=torch.long).view(n_seq, per)
