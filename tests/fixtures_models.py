"""A tiny model folder (weights + meta.json + a byte-level BPE tokenizer), made offline in a tmp dir.

    from fixtures_models import make_model_dir   # tests/ is on sys.path
    path = make_model_dir(tmp_path / "m", pattern="M*")
"""

from __future__ import annotations

from pathlib import Path

import torch
from test_data_common import make_hf_tokenizer

VOCAB = 400


def tiny_model_config(pattern: str = "M*", vocab_size: int = VOCAB, d_model: int = 32, **over) -> dict:
    model = {"vocab_size": vocab_size, "d_model": d_model, "n_layers": len(pattern.replace("|", "")),
             "pattern": pattern, "norm": "rmsnorm", "mlp": "swiglu", "d_mlp": 64, "n_heads": 4,
             "max_seq_len": 256, "pad_vocab_multiple": 8, "tie_embeddings": True,
             "mamba": {"d_state": 8, "expand": 2.0},
             "mamba2": {"d_state": 16, "head_dim": 16, "n_groups": 1, "chunk_size": 16}}
    model.update(over)
    return {"model": model}


def make_model_dir(path: Path | str, pattern: str = "M*", seed: int = 0, tokenizer: bool = True, **over) -> Path:
    """Build a random tiny model of `pattern`, save it as a model folder with a BPE tokenizer."""
    from megaxatl.checkpoint import save_model_dir
    from megaxatl.config import config_from_dict, config_to_dict
    from megaxatl.models import build

    path = Path(path)
    cfg = config_from_dict(tiny_model_config(pattern, **over))
    torch.manual_seed(seed)
    model = build(cfg)
    with torch.no_grad():  # a non-trivial model: logits that differ clearly between tokens
        model.embed.weight.normal_(0, 0.15)
    tok_dir = make_hf_tokenizer(path.parent / f".{path.name}-tok", VOCAB) if tokenizer else None
    save_model_dir(path, model.state_dict(), {"config": config_to_dict(cfg), "step": 0}, tokenizer_dir=tok_dir)
    return path
