"""`from_donor(donor_path, config) -> (model, report)` and writing a transfer output folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megaxatl.config import Config, ModelConfig, config_from_dict, config_to_dict
from megaxatl.models import build
from megaxatl.transfer.plan import check_shapes, make_plan
from megaxatl.transfer.report import TransferReport, build_report


def model_dict_from_donor(spec, pattern: str, **overrides) -> dict:
    """The `model` config section that reproduces the donor's blocks, with `pattern` mixers.

    An all-attention pattern gives the donor itself (the parity check); `overrides` set the rest
    (mamba sizes, fewer layers, vocab padding).
    """
    m = dict(
        vocab_size=spec.vocab_size, d_model=spec.d_model, n_layers=len(pattern.replace("|", "")), pattern=pattern,
        norm=spec.norm, norm_eps=spec.norm_eps, mlp=spec.mlp, d_mlp=spec.d_mlp, mlp_bias=spec.mlp_bias,
        parallel_residual=spec.parallel_residual, tie_embeddings=spec.tie_embeddings, n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, rotary_pct=spec.rotary_pct, rope_theta=spec.rope_theta,
        qkv_bias=spec.qkv_bias, attn_out_bias=spec.attn_out_bias, max_seq_len=spec.max_seq_len,
    )
    m.update(overrides)
    return m


def _as_config(config) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, ModelConfig):
        return Config(model=config)
    if isinstance(config, (str, Path)):
        from megaxatl.config import load_config

        return load_config(config)
    return config_from_dict(config)


def from_donor(donor_path, config, mode: str | None = None, layer_map: list[int] | None = None,
               dtype: torch.dtype = torch.float32, seed: int | None = None):
    """Build the target from `config`, copy the donor's shared components into it.

    donor_path: a donor folder / GGUF file, or a named asset ("smollm2-135m").
    config: a Config, ModelConfig, config dict or config path. mode / layer_map default to the
    config's transfer section. Returns (model, TransferReport); all checks run before any copy.
    """
    from megaxatl.assets.donors import resolve_donor
    from megaxatl.donors import open_donor

    cfg = _as_config(config)
    mode = mode or cfg.transfer.mode
    layer_map = layer_map if layer_map is not None else cfg.transfer.layer_map
    donor = open_donor(resolve_donor(str(donor_path)))
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in build(cfg).named_parameters()}
    plan = make_plan(donor.spec, cfg.model, shapes, donor.keys(), mode, layer_map)
    check_shapes(plan, shapes, donor.shape)

    # fresh parameters: the layout-free init (models.lm.build_unit), as the streamed output has them
    model = build(cfg, seed=cfg.train.seed if seed is None else seed).to(dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for c in plan.copies:
            t = donor.get(c.source)
            if c.transform is not None:
                t = c.transform(t)
            dst = params[c.target]
            (dst[c.index] if c.index else dst).copy_(t.to(dst.dtype))
    report = build_report(plan, donor, shapes, str(donor_path), cfg.model.pattern, cfg.model.init_std, cfg.model.n_layers)
    report.tokenizer_dir = str(donor.tokenizer_dir) if donor.tokenizer_dir else None
    return model, report


def write_transfer(out: str | Path, model, config, report: TransferReport, overwrite: bool = False) -> Path:
    """A model folder (megaxatl/checkpoint/model_dir.py) plus report.json; atomic."""
    from megaxatl.checkpoint import save_model_dir

    cfg = _as_config(config)
    meta = {"config": config_to_dict(cfg), "step": 0, "transferred": report.transferred, "report": report.to_dict(),
            "source": "megaxatl transfer"}
    out = save_model_dir(out, model.state_dict(), meta, tokenizer_dir=report.tokenizer_dir,
                         overwrite=overwrite, extra_files={"report.json": report.to_json()})
    return out


def read_report(path: str | Path) -> dict:
    return json.loads((Path(path) / "report.json").read_text())
