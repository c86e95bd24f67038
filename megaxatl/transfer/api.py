"""`from_donor(donor_path, config) -> (model, report)` and writing a transfer output folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megaxatl.config import Config, ModelConfig, config_from_dict, config_to_dict
from megaxatl.models import build
from megaxatl.transfer.report import TransferReport


def model_dict_from_donor(spec, pattern: str, layer_map: list[int] | None = None, **overrides) -> dict:
    """The `model` config section that reproduces the donor's blocks, with `pattern` mixers.

    An all-attention pattern gives the donor itself (the parity check): each '*' becomes the
    attention kind of the donor layer it takes (layer_map, default evenly spaced): '*' full or
    'W' sliding window. `overrides` set the rest (mamba sizes, fewer layers, vocab padding).
    """
    from megaxatl.transfer.plan import default_layer_map

    symbols = [c for c in pattern if c != "|"]
    lmap = layer_map if layer_map is not None else default_layer_map(len(symbols), spec.n_layers)
    if len(lmap) == len(symbols):  # else make_plan names the mismatch
        attn = iter(spec.attention_symbol(j) for s, j in zip(symbols, lmap) if s == "*")
        pattern = "".join(next(attn) if c == "*" else c for c in pattern)
    m = dict(
        vocab_size=spec.vocab_size, d_model=spec.d_model, n_layers=len(symbols), pattern=pattern,
        norm=spec.norm, norm_eps=spec.norm_eps, mlp=spec.mlp, d_mlp=spec.d_mlp, mlp_bias=spec.mlp_bias,
        parallel_residual=spec.parallel_residual, tie_embeddings=spec.tie_embeddings, n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, rotary_pct=spec.rotary_pct, rope_theta=spec.rope_theta,
        qkv_bias=spec.qkv_bias, attn_out_bias=spec.attn_out_bias, max_seq_len=spec.max_seq_len,
        norm_placement=spec.norm_placement, norm_unit_offset=spec.norm_unit_offset, embed_scale=spec.embed_scale,
        pos_embed=spec.has_pos_embed, logit_scale=spec.logit_scale, final_softcap=spec.final_softcap,
        qk_norm=spec.qk_norm, attn_scale=spec.attn_scale, attn_softcap=spec.attn_softcap,
    )
    if spec.rope_scaling is not None:
        m["rope_scaling"] = dict(spec.rope_scaling)
    if spec.sliding_window is not None:
        m["local_attention"] = {"window": spec.sliding_window, "rope_theta": spec.local_rope_theta,
                                "rope_scaling": None if spec.local_rope_scaling is None else dict(spec.local_rope_scaling)}
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
    config's transfer section. With transfer.keep_attention set, the attention layers to keep are
    chosen from the donor first and written into the config's model.pattern (in place). Returns (model, TransferReport); all checks run before any copy.
    """
    from megaxatl.transfer.stream import open_transfer

    cfg = _as_config(config)
    selection = None
    if cfg.transfer.keep_attention:  # rewrites cfg.model.pattern before anything is built
        from megaxatl.transfer.select import select_for_config

        selection = select_for_config(cfg, donor_path, cfg.transfer.select_data, cfg.transfer.select_tokens,
                                      method=cfg.transfer.select_method)
    source, report = open_transfer(donor_path, cfg, mode=mode, layer_map=layer_map, dtype=dtype, seed=seed)
    # fresh parameters: the layout-free init (models.lm.build_unit), as the streamed output has them
    model = build(cfg, seed=source.seed).to(dtype)
    for name, p in model.named_parameters():
        source.write_copies(name, p.data)
    report.selection = selection.to_dict() if selection is not None else None
    report.selection_table = selection.table() if selection is not None else None
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
