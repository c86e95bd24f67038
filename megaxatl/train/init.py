"""Initial weights: a model folder (`train.init_from`), a donor (`transfer.donor`), or scratch.

The three differ only in where the weights come from; the rest of the config is the same, which
is the paper's comparison (XATL vs training from scratch). Every rank builds the same model
(the same seed), so no broadcast is needed before DeepSpeed partitions it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megaxatl.config import Config


@dataclass
class Initial:
    model: torch.nn.Module
    source: str  # "init_from:<path>", "donor:<name>", "scratch", "resume"
    transferred: list[str] = field(default_factory=list)
    report: dict | None = None
    tokenizer_dir: str | None = None


def build_initial(cfg: Config, resuming: bool) -> Initial:
    from megaxatl.models import build

    torch.manual_seed(cfg.train.seed)
    if resuming:
        # The checkpoint holds the weights and the transferred names: skip reading the donor.
        return Initial(build(cfg), "resume")
    if cfg.train.init_from:
        return _from_model_dir(cfg, Path(cfg.train.init_from))
    if cfg.transfer.donor:
        from megaxatl.transfer import from_donor  # lazy: donor readers pull in transformers

        model, report = from_donor(cfg.transfer.donor, cfg, seed=cfg.train.seed)
        return Initial(model, f"donor:{cfg.transfer.donor}", list(report.transferred), report.to_dict(),
                       report.tokenizer_dir)
    return Initial(build(cfg), "scratch")


def _from_model_dir(cfg: Config, path: Path) -> Initial:
    from megaxatl.checkpoint import CheckpointError, load_model_dir
    from megaxatl.models import build

    state, meta = load_model_dir(path)
    model = build(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path}: its weights do not fit this config's model section: "
                              f"{str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: its weights do not fit this config's model section "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    tok = path / "tokenizer"
    return Initial(model, f"init_from:{path}", list(meta.get("transferred", [])), meta.get("report"),
                   str(tok) if tok.is_dir() else None)
