"""Which Hugging Face class reproduces a megaxatl model EXACTLY, its config, and its key table.

`ARCHS` is tried in order; the first whose `fits` finds no reason wins, and `remote` (the shipped
plain-PyTorch model code, `trust_remote_code=True`) fits everything:

    llama ... stablelm, gpt_neox, gpt2   the donor families (megaxatl/donors): an all-attention
        model fits when the family's config writer, read back by the family's own donor reader
        (as transformers interprets that config), describes exactly this model: one reader
        decides both what a donor means and what an export means, and the reasons a class does
        not fit are the fields that came back different
    mamba     MambaForCausalLM     all Mamba-1, no MLP, RMSNorm, whole-number expand
    mamba2    Mamba2ForCausalLM    all Mamba-2, no MLP, RMSNorm, whole-number expand, gated-norm
                                   eps equal to the block norm eps
    bamba     BambaForCausalLM     Mamba-2 with or without full attention, SwiGLU, RMSNorm,
                                   sequential, whole-number expand, gated-norm eps = norm eps
    remote    MegaxatlForCausalLM  everything (Mamba-1 hybrids, retention, GLA, the rest)

The key tables are the litgpt-style ones of donors/keymap.py, read in both directions: the donor
families' own tables, and below the literal tables of the SSM classes; the remote code keeps our
own parameter names under `model.`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from megaxatl.config import Config, ModelConfig, config_from_dict, config_to_dict
from megaxatl.donors.keymap import KeyMap

_SSM_MIXER = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "A_log", "D", "out_proj.weight",
              "out_proj.bias")
MAMBA_PARAMS = _SSM_MIXER + ("x_proj.weight", "dt_proj.weight", "dt_proj.bias")
MAMBA2_PARAMS = _SSM_MIXER + ("dt_bias", "norm.weight")


def _ssm_keymap(params: tuple[str, ...]) -> KeyMap:
    base = {"embeddings.weight": "embed.weight", "norm_f.weight": "norm_f.weight",
            "layers.{}.norm.weight": "layers.{}.norm1.weight"}
    base |= {f"layers.{{}}.mixer.{p}": f"layers.{{}}.mixer.{p}" for p in params}
    return KeyMap(("backbone.",), "embeddings.weight", base, {"lm_head.weight": "lm_head.weight"})


MAMBA_KEYMAP = _ssm_keymap(MAMBA_PARAMS)
MAMBA2_KEYMAP = _ssm_keymap(MAMBA2_PARAMS)
_BAMBA = {"embed_tokens.weight": "embed.weight", "final_layernorm.weight": "norm_f.weight",
          "layers.{}.input_layernorm.weight": "layers.{}.norm1.weight",
          "layers.{}.pre_ff_layernorm.weight": "layers.{}.norm2.weight"}
_BAMBA |= {f"layers.{{}}.mamba.{p}": f"layers.{{}}.mixer.{p}" for p in MAMBA2_PARAMS}
_BAMBA |= {f"layers.{{}}.self_attn.{n}_proj.{k}": f"layers.{{}}.mixer.{n}_proj.{k}" for n in "qkvo"
           for k in ("weight", "bias")}
_BAMBA |= {f"layers.{{}}.feed_forward.{n}_proj.{k}": f"layers.{{}}.mlp.{n}_proj.{k}" for n in ("gate", "up", "down")
           for k in ("weight", "bias")}
BAMBA_KEYMAP = KeyMap(("model.",), "embed_tokens.weight", _BAMBA, {"lm_head.weight": "lm_head.weight"})


def remote_keymap(shapes: dict) -> KeyMap:
    """The shipped model code's table: each of this model's parameters as itself under `model.`."""
    import re

    names = {re.sub(r"^layers\.\d+\.", "layers.{}.", n) for n in shapes if n != "lm_head.weight"}
    return KeyMap(("model.",), "embed.weight", {n: n for n in sorted(names)}, {"lm_head.weight": "lm_head.weight"})


# ---- which class fits ------------------------------------------------------------------------

def _symbols_in(cfg: ModelConfig, allowed: str, what: str) -> list[str]:
    bad = sorted(set(cfg.layer_symbols) - set(allowed))
    return [f"pattern has {', '.join(repr(s) for s in bad)} layers ({what} only)"] if bad else []


def _need(ok: bool, why: str) -> list[str]:
    return [] if ok else [why]


def _plain_blocks(cfg: ModelConfig) -> list[str]:
    """Reasons a model is not made of plain pre-norm blocks (what the SSM classes are)."""
    defaults = ModelConfig(vocab_size=1, d_model=1, n_layers=1, pattern="M")
    keys = ("norm_placement", "norm_unit_offset", "embed_scale", "pos_embed", "logit_scale", "final_softcap")
    return [f"{k} {getattr(cfg, k)!r}" for k in keys if getattr(cfg, k) != getattr(defaults, k)]


def _plain_attention(cfg: ModelConfig) -> list[str]:
    defaults = ModelConfig(vocab_size=1, d_model=1, n_layers=1, pattern="*")
    keys = ("qk_norm", "attn_scale", "attn_softcap", "rope_scaling")
    return [f"{k} {getattr(cfg, k)!r}" for k in keys if getattr(cfg, k) != getattr(defaults, k)]


def _whole_expand(section) -> list[str]:
    return _need(float(section.expand).is_integer(), f"expand {section.expand} is not a whole number")


def _mamba2_eps(cfg: ModelConfig, facts: dict) -> list[str]:
    eps = facts.get("mamba2_norm_eps")
    return _need(eps is None or eps == cfg.norm_eps,
                 f"Mamba-2 gated norm eps {eps} differs from norm_eps {cfg.norm_eps} (one eps in the HF config)")


def fits_mamba(cfg: ModelConfig, facts: dict) -> list[str]:
    return (_symbols_in(cfg, "M", "Mamba-1") + _need(cfg.mlp == "none", "blocks have an MLP")
            + _need(cfg.norm == "rmsnorm", "norm is not rmsnorm") + _whole_expand(cfg.mamba) + _plain_blocks(cfg))


def fits_mamba2(cfg: ModelConfig, facts: dict) -> list[str]:
    return (_symbols_in(cfg, "S", "Mamba-2") + _need(cfg.mlp == "none", "blocks have an MLP")
            + _need(cfg.norm == "rmsnorm", "norm is not rmsnorm") + _whole_expand(cfg.mamba2)
            + _mamba2_eps(cfg, facts) + _plain_blocks(cfg))


def fits_bamba(cfg: ModelConfig, facts: dict) -> list[str]:
    has_attn = "*" in cfg.layer_symbols
    return (_symbols_in(cfg, "S*", "Mamba-2 and full attention") + _need("S" in cfg.layer_symbols, "no Mamba-2 layer")
            + _need(cfg.mlp == "swiglu", "mlp is not swiglu") + _need(cfg.norm == "rmsnorm", "norm is not rmsnorm")
            + _need(not cfg.parallel_residual, "parallel residual") + _whole_expand(cfg.mamba2)
            + _mamba2_eps(cfg, facts) + _plain_blocks(cfg) + (_plain_attention(cfg) if has_attn else [])
            + _need(not has_attn or cfg.qkv_bias == cfg.attn_out_bias,
                    "q/k/v and o biases differ (attention_bias sets all four)"))


def _comparable(m: ModelConfig) -> dict:
    """What decides a model's function and parameters, in effective values."""
    symbols = m.layer_symbols
    out = {k: getattr(m, k) for k in (
        "vocab_size", "d_model", "n_layers", "norm", "norm_eps", "mlp", "d_mlp", "mlp_bias", "parallel_residual",
        "tie_embeddings", "max_seq_len", "norm_placement", "norm_unit_offset", "embed_scale", "pos_embed",
        "logit_scale", "final_softcap")}
    out["layers"] = "".join(symbols)
    if any(s in "*W" for s in symbols):
        out |= {k: getattr(m, k) for k in ("n_heads", "kv_heads", "attn_head_dim", "rotary_pct", "qkv_bias",
                                           "attn_out_bias", "qk_norm", "attn_softcap")}
        out["attn_scale"] = m.attn_head_dim ** -0.5 if m.attn_scale is None else m.attn_scale
        out["rope"] = m.rope_of("*")
    if "W" in symbols:
        out["window"], out["local rope"] = m.local_attention.window, m.rope_of("W")
    return out


def family_fits(module: ModuleType, model_type: str, hf_class: str) -> Callable[[ModelConfig, dict], list[str]]:
    """Round trip: our config -> the family's HF config -> the family's donor reader -> the model
    config a transfer would build; every field that comes back different is a reason."""
    from megaxatl.donors import DonorError
    from megaxatl.donors.donor import spec_of_config
    from megaxatl.transfer.api import model_dict_from_donor

    def fits(cfg: ModelConfig, facts: dict) -> list[str]:
        reasons = _symbols_in(cfg, "*W", "softmax attention")
        if reasons:
            return reasons
        try:
            hf = module.hf_config(cfg, model_type) | {"model_type": model_type}
            spec = spec_of_config(hf, f"{hf_class} config")
            back = config_from_dict({"model": model_dict_from_donor(spec, "*" * spec.n_layers)}).model
        except (DonorError, ValueError) as e:
            return [str(e)]
        ours, theirs = _comparable(cfg), _comparable(back)
        return [f"{k} {ours.get(k)!r} (as {hf_class}: {theirs.get(k)!r})" for k in ours if ours[k] != theirs.get(k)]

    return fits


# ---- HF configs of the SSM classes and the remote code --------------------------------------

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
                time_step_limit=(0.0, float("inf")),
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                 "partial_rotary_factor": cfg.rotary_pct},
                attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, initializer_range=cfg.init_std)


def remote_config(cfg: ModelConfig, facts: dict) -> dict:
    model_section = config_to_dict(Config(model=cfg))["model"]
    return dict(megaxatl_model=model_section, mamba2_norm_eps=facts.get("mamba2_norm_eps") or 1e-5,
                tie_word_embeddings=cfg.tie_embeddings,
                auto_map={"AutoConfig": "configuration_megaxatl.MegaxatlConfig",
                          "AutoModelForCausalLM": "modeling_megaxatl.MegaxatlForCausalLM"})


# ---- the table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    name: str
    hf_class: str
    model_type: str
    fits: Callable[[ModelConfig, dict], list[str]]  # reasons it is not an exact match ([] = it is)
    hf_config: Callable[[ModelConfig, dict], dict]
    keymap: Callable[[dict], KeyMap]  # facts -> the key table

    @property
    def remote(self) -> bool:
        return self.model_type == "megaxatl"


def _family_arch(model_type: str) -> Arch:
    from megaxatl.donors.donor import FAMILY_MODULES

    module = FAMILY_MODULES[model_type]
    hf_class = module.HF_CLASSES[model_type]
    return Arch(model_type, hf_class, model_type, family_fits(module, model_type, hf_class),
                lambda cfg, facts: module.hf_config(cfg, model_type), lambda facts: module.KEYMAPS[model_type])


# stock classes tried first: the plainest (llama) before the ones that only add options
FAMILY_ORDER = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "stablelm",
                "gpt_neox", "gpt2")
ARCHS = tuple(_family_arch(t) for t in FAMILY_ORDER) + (
    Arch("mamba", "MambaForCausalLM", "mamba", fits_mamba, mamba_config, lambda facts: MAMBA_KEYMAP),
    Arch("mamba2", "Mamba2ForCausalLM", "mamba2", fits_mamba2, mamba2_config, lambda facts: MAMBA2_KEYMAP),
    Arch("bamba", "BambaForCausalLM", "bamba", fits_bamba, bamba_config, lambda facts: BAMBA_KEYMAP),
    Arch("remote", "MegaxatlForCausalLM", "megaxatl", lambda cfg, facts: [], remote_config,
         lambda facts: remote_keymap(facts["shapes"])),
)
ARCH_NAMES = tuple(a.name for a in ARCHS)


def arch_named(name: str) -> Arch | None:
    return next((a for a in ARCHS if a.name == name), None)
