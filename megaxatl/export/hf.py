"""A megaxatl model folder <-> a Hugging Face folder that `AutoModelForCausalLM` loads.

Export picks the first stock transformers class that reproduces the model EXACTLY (same blocks,
norms, rotary, biases, eps), else ships plain-PyTorch model code (`remote/`) loaded with
`trust_remote_code=True`. Which of our configs fits which class, and why not, is decided by the
`fits` function of each `Arch` in `ARCHS`, in order:

    llama     LlamaForCausalLM     all attention, RMSNorm, SwiGLU, sequential, full rotary,
                                   q/k/v/o biases all on or all off
    qwen2     Qwen2ForCausalLM     as llama, but q/k/v biases only (no o / MLP bias)
    gpt_neox  GPTNeoXForCausalLM   all attention, LayerNorm, plain MLP with biases, no GQA,
                                   any rotary fraction, parallel or sequential residual
    mamba     MambaForCausalLM     all Mamba-1, no MLP, RMSNorm, whole-number expand
    mamba2    Mamba2ForCausalLM    all Mamba-2, no MLP, RMSNorm, whole-number expand, gated-norm
                                   eps equal to the block norm eps
    bamba     BambaForCausalLM     Mamba-2 with or without attention, SwiGLU, RMSNorm, sequential,
                                   whole-number expand, gated-norm eps equal to the norm eps
    remote    MegaxatlForCausalLM  everything (Mamba-1 hybrids, retention, GLA, the rest)

Weights are renamed by explicit tables of module-path prefixes (`KeyTable`), one per class; every
tensor must match a rule both ways (an unknown key is an error naming it), GPT-NeoX's per-head
fused query_key_value is packed / unpacked exactly, and nothing is cast, so import gives back the
original tensors bit for bit.

Our embedding and head carry `padded_vocab_size` rows (TP / kernel padding, never predicted);
the exported model has exactly `vocab_size` rows, so its logits have the same shape as ours. The
padding rows travel in `megaxatl_vocab_pad.safetensors` for the way back, and the original
meta.json (config, step, transfer report) in `megaxatl_export.json`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megaxatl.config import Config, ModelConfig, config_from_dict, config_to_dict
from megaxatl.fsutil import atomic_dir

FORMAT = "megaxatl-hf-export"
VERSION = 1
SIDECAR = "megaxatl_export.json"
PAD_FILE = "megaxatl_vocab_pad.safetensors"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HEAD_ROWS = ("embed.weight", "lm_head.weight")
# files of a model folder that are never tokenizer files (a transfer may have copied a whole donor
# folder as tokenizer/): these must not land on top of the export's own files
_NOT_TOKENIZER = re.compile(r"(config\.json|generation_config\.json|meta\.json|report\.json|README\.md|"
                            r".*\.(safetensors|bin|pt|pth|gguf|py|index\.json))")


class ExportError(ValueError):
    """A model or folder that cannot be exported / imported faithfully; the message names it."""


# ---- key tables ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fused:
    """Several of our tensors stored as one HF tensor (e.g. GPT-NeoX's query_key_value)."""

    hf: str  # HF prefix inside the layer
    parts: tuple[str, ...]  # our prefixes inside the layer, in packing order
    pack: Callable[[list[torch.Tensor], ModelConfig], torch.Tensor]
    unpack: Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]


@dataclass(frozen=True)
class KeyTable:
    """Renames of module-path prefixes (longest prefix wins; a tensor keeps its own suffix).

    top: our prefix -> HF prefix outside the layers; layer: the HF prefix of layer i ('{}');
    block: per mixer symbol, our prefix inside a layer -> HF prefix inside the layer;
    aliases: extra HF prefixes accepted on import (spellings other transformers versions save)."""

    top: dict[str, str]
    layer: str
    block: dict[str, dict[str, str]]
    fused: tuple[Fused, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)


def _neox_pack(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    # (H * 3 * hd, ...) laid out (H, 3, hd, ...): HF views it (.., H, 3 * hd) and chunks in 3
    H, hd = cfg.n_heads, cfg.attn_head_dim
    return torch.stack([p.reshape(H, hd, *p.shape[1:]) for p in parts], dim=1).reshape(-1, *parts[0].shape[1:])


def _neox_unpack(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    H, hd = cfg.n_heads, cfg.attn_head_dim
    v = t.reshape(H, 3, hd, *t.shape[1:])
    return [v[:, i].reshape(H * hd, *t.shape[1:]).clone() for i in range(3)]


_LLAMA_BLOCK = {"norm1.": "input_layernorm.", "mixer.": "self_attn.", "norm2.": "post_attention_layernorm.",
                "mlp.": "mlp."}
LLAMA_KEYS = KeyTable(
    top={"embed.": "model.embed_tokens.", "norm_f.": "model.norm.", "lm_head.": "lm_head."},
    layer="model.layers.{}.",
    block={"*": _LLAMA_BLOCK},
)
GPT_NEOX_KEYS = KeyTable(
    # the file's name for the head (transformers 5 renames it lm_head in the module, and back on save)
    top={"embed.": "gpt_neox.embed_in.", "norm_f.": "gpt_neox.final_layer_norm.", "lm_head.": "embed_out."},
    layer="gpt_neox.layers.{}.",
    block={"*": {"norm1.": "input_layernorm.", "mixer.o_proj.": "attention.dense.",
                 "norm2.": "post_attention_layernorm.", "mlp.up_proj.": "mlp.dense_h_to_4h.",
                 "mlp.down_proj.": "mlp.dense_4h_to_h."}},
    fused=(Fused("attention.query_key_value.", ("mixer.q_proj.", "mixer.k_proj.", "mixer.v_proj."),
                 _neox_pack, _neox_unpack),),
    aliases={"lm_head.": "lm_head."},
)
_MAMBA_TOP = {"embed.": "backbone.embeddings.", "norm_f.": "backbone.norm_f.", "lm_head.": "lm_head."}
MAMBA_KEYS = KeyTable(top=_MAMBA_TOP, layer="backbone.layers.{}.",
                      block={"M": {"norm1.": "norm.", "mixer.": "mixer."}})
MAMBA2_KEYS = KeyTable(top=_MAMBA_TOP, layer="backbone.layers.{}.",
                       block={"S": {"norm1.": "norm.", "mixer.": "mixer."}})
_BAMBA_BLOCK = {"norm1.": "input_layernorm.", "norm2.": "pre_ff_layernorm.", "mlp.": "feed_forward."}
BAMBA_KEYS = KeyTable(
    top={"embed.": "model.embed_tokens.", "norm_f.": "model.final_layernorm.", "lm_head.": "lm_head."},
    layer="model.layers.{}.",
    block={"*": {**_BAMBA_BLOCK, "mixer.": "self_attn."}, "S": {**_BAMBA_BLOCK, "mixer.": "mamba."}},
)
# the shipped model code uses our own module names under `model.`
REMOTE_KEYS = KeyTable(
    top={"embed.": "model.embed.", "norm_f.": "model.norm_f.", "lm_head.": "lm_head."},
    layer="model.layers.{}.",
    block={s: {"": ""} for s in "*MSRG"},
)


def _rename(name: str, table: dict[str, str]) -> str | None:
    for src in sorted(table, key=len, reverse=True):
        if name.startswith(src):
            return table[src] + name[len(src):]
    return None


def to_hf_keys(state: dict[str, torch.Tensor], cfg: ModelConfig, table: KeyTable, what: str) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors; every tensor must match a rule of `table`."""
    symbols = cfg.layer_symbols
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[int, Fused, str], dict[str, torch.Tensor]] = {}

    def put(key: str, t: torch.Tensor, src: str) -> None:
        if key in out:
            raise ExportError(f"{what}: two tensors map to {key!r} (the second is {src!r})")
        out[key] = t

    for name, t in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            key = _rename(name, table.top)
            if key is None:
                raise ExportError(f"{what}: tensor {name!r} has no rule in the key table")
            put(key, t, name)
            continue
        i, rest = int(m[1]), m[2]
        fused = next(((f, p) for f in table.fused for p in f.parts if rest.startswith(p)), None)
        if fused is not None:
            f, p = fused
            pending.setdefault((i, f, rest[len(p):]), {})[p] = t
            continue
        block = table.block.get(symbols[i])
        hf_rest = _rename(rest, block) if block is not None else None
        if hf_rest is None:
            raise ExportError(f"{what}: tensor {name!r} (mixer '{symbols[i]}') has no rule in the key table")
        put(table.layer.format(i) + hf_rest, t, name)
    for (i, f, suffix), parts in pending.items():
        missing = [p for p in f.parts if p not in parts]
        if missing:
            raise ExportError(f"{what}: layer {i} lacks {missing[0]}{suffix} to fuse into {f.hf}{suffix}")
        put(table.layer.format(i) + f.hf + suffix, f.pack([parts[p] for p in f.parts], cfg), f"layers.{i}.{f.hf}")
    return out


def from_hf_keys(tensors: dict[str, torch.Tensor], cfg: ModelConfig, table: KeyTable,
                 where: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (inverse of `to_hf_keys`); an unknown key is an error naming it."""
    symbols = cfg.layer_symbols
    layer_re = re.compile(re.escape(table.layer).replace(r"\{\}", r"(\d+)") + r"(.+)")
    top_inv = {hf: ours for ours, hf in table.top.items()} | table.aliases
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = layer_re.fullmatch(key)
        names: list[tuple[str, torch.Tensor]]
        if m is not None and int(m[1]) < len(symbols):
            i, rest = int(m[1]), m[2]
            f = next((f for f in table.fused if rest.startswith(f.hf)), None)
            if f is not None:
                suffix = rest[len(f.hf):]
                names = [(f"layers.{i}.{p}{suffix}", part) for p, part in zip(f.parts, f.unpack(t, cfg))]
            else:
                block = table.block.get(symbols[i], {})
                ours = _rename(rest, {hf: o for o, hf in block.items()})
                names = [(f"layers.{i}.{ours}", t)] if ours is not None else []
        else:
            ours = _rename(key, top_inv)
            names = [(ours, t)] if ours is not None else []
        if not names:
            raise ExportError(f"{where}: unknown tensor key {key!r} for this model's layout")
        for name, part in names:
            if name in out:
                raise ExportError(f"{where}: {name!r} is given twice (second by {key!r})")
            out[name] = part
    return out


# ---- which class fits ------------------------------------------------------------------------

def _symbols_in(cfg: ModelConfig, allowed: str, what: str) -> list[str]:
    bad = sorted(set(cfg.layer_symbols) - set(allowed))
    return [f"pattern has {', '.join(repr(s) for s in bad)} layers ({what} only)"] if bad else []


def _need(ok: bool, why: str) -> list[str]:
    return [] if ok else [why]


def _whole_expand(section) -> list[str]:
    return _need(float(section.expand).is_integer(), f"expand {section.expand} is not a whole number")


def _mamba2_eps(cfg: ModelConfig, facts: dict) -> list[str]:
    eps = facts.get("mamba2_norm_eps")
    return _need(eps is None or eps == cfg.norm_eps,
                 f"Mamba-2 gated norm eps {eps} differs from norm_eps {cfg.norm_eps} (one eps in the HF config)")


def _fits_llama_like(cfg: ModelConfig) -> list[str]:
    return (_symbols_in(cfg, "*", "attention") + _need(cfg.norm == "rmsnorm", "norm is not rmsnorm")
            + _need(cfg.mlp == "swiglu", "mlp is not swiglu")
            + _need(not cfg.parallel_residual, "parallel residual")
            + _need(cfg.rotary_pct == 1.0, f"rotary_pct {cfg.rotary_pct} (Llama-family RoPE rotates whole heads)"))


def fits_llama(cfg: ModelConfig, facts: dict) -> list[str]:
    return _fits_llama_like(cfg) + _need(cfg.qkv_bias == cfg.attn_out_bias,
                                         "q/k/v and o biases differ (attention_bias sets all four)")


def fits_qwen2(cfg: ModelConfig, facts: dict) -> list[str]:
    return _fits_llama_like(cfg) + _need(cfg.qkv_bias and not cfg.attn_out_bias and not cfg.mlp_bias,
                                         "Qwen2 has q/k/v biases only")


def fits_gpt_neox(cfg: ModelConfig, facts: dict) -> list[str]:
    return (_symbols_in(cfg, "*", "attention") + _need(cfg.norm == "layernorm", "norm is not layernorm")
            + _need(cfg.mlp in NEOX_ACT, f"mlp '{cfg.mlp}' is not a plain gelu / gelu_tanh / relu MLP")
            + _need(cfg.mlp_bias, "no MLP biases (GPT-NeoX always has them)")
            + _need(cfg.qkv_bias == cfg.attn_out_bias, "q/k/v and o biases differ (attention_bias sets all four)")
            + _need(cfg.kv_heads == cfg.n_heads, "grouped-query attention")
            + _need(cfg.n_heads * cfg.attn_head_dim == cfg.d_model, "head_dim * n_heads != d_model"))


def fits_mamba(cfg: ModelConfig, facts: dict) -> list[str]:
    return (_symbols_in(cfg, "M", "Mamba-1") + _need(cfg.mlp == "none", "blocks have an MLP")
            + _need(cfg.norm == "rmsnorm", "norm is not rmsnorm") + _whole_expand(cfg.mamba))


def fits_mamba2(cfg: ModelConfig, facts: dict) -> list[str]:
    return (_symbols_in(cfg, "S", "Mamba-2") + _need(cfg.mlp == "none", "blocks have an MLP")
            + _need(cfg.norm == "rmsnorm", "norm is not rmsnorm") + _whole_expand(cfg.mamba2)
            + _mamba2_eps(cfg, facts))


def fits_bamba(cfg: ModelConfig, facts: dict) -> list[str]:
    has_attn = "*" in cfg.layer_symbols
    return (_symbols_in(cfg, "S*", "Mamba-2 and attention") + _need("S" in cfg.layer_symbols, "no Mamba-2 layer")
            + _need(cfg.mlp == "swiglu", "mlp is not swiglu") + _need(cfg.norm == "rmsnorm", "norm is not rmsnorm")
            + _need(not cfg.parallel_residual, "parallel residual") + _whole_expand(cfg.mamba2)
            + _mamba2_eps(cfg, facts)
            + _need(not has_attn or cfg.qkv_bias == cfg.attn_out_bias,
                    "q/k/v and o biases differ (attention_bias sets all four)"))


# ---- HF configs ------------------------------------------------------------------------------

NEOX_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _rope(cfg: ModelConfig, partial: bool) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if partial:
        rope["partial_rotary_factor"] = cfg.rotary_pct
    return rope


def llama_config(cfg: ModelConfig, facts: dict) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.attn_head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, rope_parameters=_rope(cfg, False),
                attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, initializer_range=cfg.init_std)


def qwen2_config(cfg: ModelConfig, facts: dict) -> dict:
    c = llama_config(cfg, facts)
    del c["attention_bias"], c["mlp_bias"]
    return c | dict(use_sliding_window=False, layer_types=["full_attention"] * cfg.n_layers)


def gpt_neox_config(cfg: ModelConfig, facts: dict) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp, hidden_act=NEOX_ACT[cfg.mlp],
                max_position_embeddings=cfg.max_seq_len, layer_norm_eps=cfg.norm_eps,
                tie_word_embeddings=cfg.tie_embeddings, use_parallel_residual=cfg.parallel_residual,
                attention_bias=cfg.qkv_bias, rope_parameters=_rope(cfg, True), initializer_range=cfg.init_std)


def _ssm_common(cfg: ModelConfig, m) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, state_size=m.d_state,
                num_hidden_layers=cfg.n_layers, layer_norm_epsilon=cfg.norm_eps, expand=int(m.expand),
                conv_kernel=m.d_conv, use_bias=m.proj_bias, use_conv_bias=m.conv_bias, time_step_min=m.dt_min,
                time_step_max=m.dt_max, time_step_floor=m.dt_init_floor, tie_word_embeddings=cfg.tie_embeddings,
                residual_in_fp32=True, initializer_range=cfg.init_std)


def mamba_config(cfg: ModelConfig, facts: dict) -> dict:
    m = cfg.mamba
    return _ssm_common(cfg, m) | dict(time_step_rank=m.dt_rank or math.ceil(cfg.d_model / 16))


def mamba2_config(cfg: ModelConfig, facts: dict) -> dict:
    m = cfg.mamba2
    d_inner = int(m.expand * cfg.d_model)
    return _ssm_common(cfg, m) | dict(num_heads=d_inner // m.head_dim, head_dim=m.head_dim, n_groups=m.n_groups,
                                      chunk_size=m.chunk_size, time_step_limit=(0.0, float("inf")))


def bamba_config(cfg: ModelConfig, facts: dict) -> dict:
    m = cfg.mamba2
    d_inner = int(m.expand * cfg.d_model)
    return dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, hidden_size=cfg.d_model,
                intermediate_size=cfg.d_mlp, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim, hidden_act="silu",
                rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
                attn_layer_indices=[i for i, s in enumerate(cfg.layer_symbols) if s == "*"],
                mamba_n_heads=d_inner // m.head_dim, mamba_d_head=m.head_dim, mamba_n_groups=m.n_groups,
                mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=int(m.expand),
                mamba_chunk_size=m.chunk_size, mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.proj_bias,
                time_step_limit=(0.0, float("inf")), rope_parameters=_rope(cfg, True),
                attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, initializer_range=cfg.init_std)


def remote_config(cfg: ModelConfig, facts: dict) -> dict:
    model_section = config_to_dict(Config(model=cfg))["model"]
    return dict(megaxatl_model=model_section, mamba2_norm_eps=facts.get("mamba2_norm_eps") or 1e-5,
                tie_word_embeddings=cfg.tie_embeddings,
                auto_map={"AutoConfig": "configuration_megaxatl.MegaxatlConfig",
                          "AutoModelForCausalLM": "modeling_megaxatl.MegaxatlForCausalLM"})


@dataclass(frozen=True)
class Arch:
    name: str
    hf_class: str
    model_type: str
    fits: Callable[[ModelConfig, dict], list[str]]  # reasons it is not an exact match ([] = it is)
    hf_config: Callable[[ModelConfig, dict], dict]
    keys: KeyTable

    @property
    def remote(self) -> bool:
        return self.model_type == "megaxatl"


ARCHS = (
    Arch("llama", "LlamaForCausalLM", "llama", fits_llama, llama_config, LLAMA_KEYS),
    Arch("qwen2", "Qwen2ForCausalLM", "qwen2", fits_qwen2, qwen2_config, LLAMA_KEYS),
    Arch("gpt_neox", "GPTNeoXForCausalLM", "gpt_neox", fits_gpt_neox, gpt_neox_config, GPT_NEOX_KEYS),
    Arch("mamba", "MambaForCausalLM", "mamba", fits_mamba, mamba_config, MAMBA_KEYS),
    Arch("mamba2", "Mamba2ForCausalLM", "mamba2", fits_mamba2, mamba2_config, MAMBA2_KEYS),
    Arch("bamba", "BambaForCausalLM", "bamba", fits_bamba, bamba_config, BAMBA_KEYS),
    Arch("remote", "MegaxatlForCausalLM", "megaxatl", lambda cfg, facts: [], remote_config, REMOTE_KEYS),
)
ARCH_NAMES = tuple(a.name for a in ARCHS)


def model_facts(cfg: ModelConfig) -> dict:
    """What the built model knows beyond its config section (built on the meta device: no memory)."""
    from megaxatl.models import build
    from megaxatl.models.mamba2 import Mamba2

    with torch.device("meta"):
        model = build(cfg)
    eps = {m.norm.eps for m in model.modules() if isinstance(m, Mamba2)}
    if len(eps) > 1:
        raise ExportError(f"Mamba-2 layers use different gated-norm eps {sorted(eps)}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {"mamba2_norm_eps": eps.pop() if eps else None, "shapes": shapes}


def choose_arch(cfg: ModelConfig, facts: dict, name: str = "auto") -> Arch:
    """The first exact stock match (or the named one, which must fit), else remote code."""
    if name == "auto":
        return next(a for a in ARCHS if not a.fits(cfg, facts))
    arch = next((a for a in ARCHS if a.name == name), None)
    if arch is None:
        raise ExportError(f"unknown architecture {name!r}; known: auto, {', '.join(ARCH_NAMES)}")
    reasons = arch.fits(cfg, facts)
    if reasons:
        raise ExportError(f"{arch.hf_class} does not reproduce this model exactly: {'; '.join(reasons)}")
    return arch


def fit_table(cfg: ModelConfig, facts: dict) -> list[tuple[str, str]]:
    """(class, 'exact match' or why not) for every architecture, in selection order."""
    return [(a.hf_class, "; ".join(a.fits(cfg, facts)) or "exact match") for a in ARCHS]


# ---- files -----------------------------------------------------------------------------------

def _tokenizer_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not _NOT_TOKENIZER.fullmatch(p.name)
                  and p.name not in (SIDECAR, PAD_FILE))


def _special_token_ids(tok_dir: Path | None) -> dict:
    """bos / eos / pad ids of the tokenizer for the HF config; unknown ones are None, never a
    class default that would name some other token."""
    ids = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    if tok_dir is None:
        return ids
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception:  # the files are still copied; only the ids in config.json stay unset
        return ids
    return {k: getattr(tok, k, None) for k in ids}


def _write_hf_config(arch: Arch, kwargs: dict, tmp: Path) -> None:
    if arch.remote:
        from megaxatl.export.remote.configuration_megaxatl import MegaxatlConfig as cls
    else:
        from transformers import AutoConfig

        cls = type(AutoConfig.for_model(arch.model_type))
    try:
        config = cls(**kwargs)
    except (ValueError, TypeError) as e:  # the class's own validation: a fits() gap, never silent
        raise ExportError(f"{arch.hf_class}: its config rejects this model ({e})") from None
    config.architectures = [arch.hf_class]
    config.save_pretrained(str(tmp))


def _readme(arch: Arch, model_dir: Path, cfg: ModelConfig) -> str:
    load = ("AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)" if arch.remote
            else "AutoModelForCausalLM.from_pretrained(folder)")
    lines = [
        f"# {model_dir.name} ({arch.hf_class})", "",
        f"Exported by `megaxatl export-hf` from the megaxatl model folder `{model_dir}`.", "",
        f"- layer pattern: `{cfg.pattern}` ({cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size})",
        f"- load with `{load}`",
        "- `megaxatl import-hf --hf FOLDER --out DIR` gives back the original model folder (bit-identical "
        f"weights, using `{SIDECAR}` and, when the vocabulary was padded, `{PAD_FILE}`)",
    ]
    if arch.remote:
        lines += [
            "",
            "No stock transformers class reproduces this layout exactly, so the folder ships its model code:",
            "`configuration_megaxatl.py` and `modeling_megaxatl.py` (self-contained: torch and transformers only,",
            "megaxatl is not needed to load it). The scans are the sequential reference recurrences;",
            "`generate` carries each layer's recurrent state (and the attention layers' KV cache) between",
            "steps, so a new token costs one step per layer. Left-padded batches (batched generation) and",
            "right-padded ones (scoring) give each row's unpadded result: padding enters no state; a gap",
            "between real tokens is refused. Import the folder back into megaxatl for fast (fused) kernels.",
        ]
    return "\n".join(lines) + "\n"


def export_hf(model_dir: str | Path, out: str | Path, overwrite: bool = False, arch: str = "auto") -> Arch:
    """Write `out`, a Hugging Face folder of the megaxatl model folder `model_dir`. Atomic."""
    from megaxatl.checkpoint import load_model_dir

    model_dir, out = Path(model_dir), Path(out)
    _distinct(model_dir, out)
    state, meta = load_model_dir(model_dir)
    cfg = config_from_dict(meta.get("config", {}), str(model_dir / "meta.json")).model
    facts = model_facts(cfg)
    _check_state(state, facts["shapes"], str(model_dir / WEIGHTS))
    chosen = choose_arch(cfg, facts, arch)
    V = cfg.vocab_size
    pad = {k: state[k][V:].contiguous() for k in HEAD_ROWS if k in state and state[k].shape[0] > V}
    body = {k: (v[:V] if k in HEAD_ROWS else v).contiguous() for k, v in state.items()}
    tensors = to_hf_keys(body, cfg, chosen.keys, f"{model_dir} -> {chosen.hf_class}")
    tok_dir = model_dir / "tokenizer"
    tok_dir = tok_dir if tok_dir.is_dir() else None
    tok_files = _tokenizer_files(tok_dir) if tok_dir else []
    dtype = str(state["embed.weight"].dtype).removeprefix("torch.")
    kwargs = chosen.hf_config(cfg, facts) | _special_token_ids(tok_dir) | {"dtype": dtype}
    sidecar = {"format": FORMAT, "version": VERSION, "arch": chosen.name, "hf_class": chosen.hf_class,
               "tokenizer_files": [p.name for p in tok_files],
               "meta": {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")}}
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if pad:
            save_file(pad, str(tmp / PAD_FILE), metadata={"format": "pt"})
        _write_hf_config(chosen, kwargs, tmp)
        if chosen.remote:
            from megaxatl.export.remote import FILES, template_dir

            for name in FILES:
                shutil.copyfile(template_dir() / name, tmp / name)
        for p in tok_files:
            shutil.copyfile(p, tmp / p.name)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(chosen, model_dir, cfg))
    return chosen


def _distinct(src: Path, out: Path) -> None:
    # an --overwrite onto the source itself would replace the only copy with its conversion
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ExportError(f"{out}: the output must not be the input folder {src} or inside it")


# ---- import ----------------------------------------------------------------------------------

def _check_state(state: dict[str, torch.Tensor], shapes: dict[str, tuple], where: str) -> None:
    missing = [k for k in shapes if k not in state]
    extra = [k for k in state if k not in shapes]
    if missing or extra:
        raise ExportError(f"{where}: does not fit its config (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, shape in shapes.items():
        if tuple(state[k].shape) != shape:
            raise ExportError(f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, the config implies {shape}")
        if not state[k].is_floating_point():
            raise ExportError(f"{where}: tensor {k!r} has dtype {state[k].dtype}, expected floating point")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable ({e})") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards a `model.safetensors.index.json` names."""
    if (folder / WEIGHTS).is_file():
        return _read_safetensors(folder / WEIGHTS)
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        raise ExportError(f"{folder}: no {WEIGHTS} (or {WEIGHTS_INDEX})")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{index}: not a safetensors index ({e})") from None
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise ExportError(f"{index}: shard name {shard!r} is not a plain file name")
        out.update(_read_safetensors(folder / shard))
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except ValueError as e:
        raise ExportError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: not a JSON object")
    return data


def import_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> str:
    """Write the megaxatl model folder `out` from the HF folder `hf_dir`; returns the source class.

    A folder written by `export_hf` comes back exactly (weights, meta, tokenizer). Other stock
    Llama / Qwen2 / Mistral / GPT-NeoX folders are read with the donor readers as an all-attention
    model (the same config a transfer would use for the donor itself)."""
    from megaxatl.checkpoint import save_model_dir

    hf_dir = Path(hf_dir)
    _distinct(hf_dir, Path(out))
    if not hf_dir.is_dir():
        raise ExportError(f"{hf_dir}: not a folder")
    hf_config = _read_json(hf_dir / "config.json")
    if not (hf_dir / SIDECAR).is_file():
        return _import_foreign(hf_dir, out, overwrite)
    sidecar = _read_json(hf_dir / SIDECAR)
    if sidecar.get("format") != FORMAT or sidecar.get("version") != VERSION:
        raise ExportError(f"{hf_dir / SIDECAR}: format {sidecar.get('format')!r} version {sidecar.get('version')!r}, "
                          f"expected {FORMAT!r} version {VERSION}")
    arch = next((a for a in ARCHS if a.name == sidecar.get("arch")), None)
    if arch is None:
        raise ExportError(f"{hf_dir / SIDECAR}: unknown arch {sidecar.get('arch')!r}")
    if hf_config.get("model_type") != arch.model_type:
        raise ExportError(f"{hf_dir / 'config.json'}: model_type {hf_config.get('model_type')!r} does not match "
                          f"the export's {arch.model_type!r}")
    meta = sidecar.get("meta") or {}
    cfg = config_from_dict(meta.get("config", {}), f"{hf_dir / SIDECAR}: meta.config").model
    facts = model_facts(cfg)
    state = from_hf_keys(read_hf_weights(hf_dir), cfg, arch.keys, str(hf_dir))
    if (hf_dir / PAD_FILE).is_file():
        for k, rows in _read_safetensors(hf_dir / PAD_FILE).items():
            if k not in state or rows.dtype != state[k].dtype:
                raise ExportError(f"{hf_dir / PAD_FILE}: padding rows {k!r} do not fit the weights")
            state[k] = torch.cat([state[k], rows])
    _check_state(state, facts["shapes"], str(hf_dir))
    with tempfile.TemporaryDirectory() as tok_tmp:
        tok_dir = _collect_tokenizer(hf_dir, sidecar.get("tokenizer_files", []), Path(tok_tmp))
        save_model_dir(out, state, meta, tokenizer_dir=tok_dir, overwrite=overwrite)
    return arch.hf_class


def _collect_tokenizer(hf_dir: Path, names: list[str], tmp: Path) -> Path | None:
    if not names:
        return None
    tok = tmp / "tokenizer"
    tok.mkdir()
    for name in names:
        src = hf_dir / name
        if Path(name).name != name or not src.is_file():
            raise ExportError(f"{hf_dir / SIDECAR}: tokenizer file {name!r} is missing from the folder")
        shutil.copyfile(src, tok / name)
    return tok


def _import_foreign(hf_dir: Path, out: str | Path, overwrite: bool) -> str:
    from megaxatl.checkpoint import save_model_dir
    from megaxatl.donors import DonorError, open_donor
    from megaxatl.transfer.api import model_dict_from_donor

    try:
        donor = open_donor(hf_dir)
    except DonorError as e:
        raise ExportError(f"not a megaxatl export (no {SIDECAR}) and not a readable stock model: {e}") from None
    with donor:
        spec = donor.spec
        if spec.has_pos_embed:
            raise ExportError(f"{hf_dir}: {spec.family} uses learned absolute positions, which megaxatl models lack")
        cfg_dict = {"model": model_dict_from_donor(spec, "*" * spec.n_layers)}
        config = config_from_dict(cfg_dict, f"{hf_dir / 'config.json'}")
        state = donor.state_dict()
        facts = model_facts(config.model)
        _check_state(state, facts["shapes"], str(hf_dir))
        meta = {"config": config_to_dict(config), "step": 0, "source": f"megaxatl import-hf {hf_dir}"}
        with tempfile.TemporaryDirectory() as tok_tmp:
            names = [p.name for p in _tokenizer_files(hf_dir)]
            tok_dir = _collect_tokenizer(hf_dir, names, Path(tok_tmp)) if donor.tokenizer_dir else None
            save_model_dir(out, state, meta, tokenizer_dir=tok_dir, overwrite=overwrite)
    return f"{spec.family} (stock)"
