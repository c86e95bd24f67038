"""The transfer plan: a table mapping canonical donor tensors onto target parameters.

Every target parameter ends up COPIED (with its donor source) or FRESH (with its init); a copy
that fills only part of a parameter (padded vocabulary rows, a Mamba out_proj wider than the
donor's W_O) is COPIED with its fresh remainder stated. Every donor tensor ends up COPIED or
DROPPED with a reason. Nothing is silent, and all checks run before any weight is touched.

What each mode copies (the paper's three, plus MambaInLlama-style `attn-init`):

    component            emb+norm   emb+norm+mlp   emb+norm+mlp+oproj   attn-init
    embedding, head         x            x                x                 x
    every norm              x            x                x                 x
    MLP                                  x                x                 x
    W_O -> mixer out_proj                                 x                 x
    V->x, K->B, Q->C                                                        x
    Q,K,V -> retention / GLA q,k,v_proj                                      x
    attention layers     all of the donor layer's attention weights, in every mode

Retention (`R`) and GLA (`G`) mixers are shaped as the donor's attention: W_O goes whole into their
o_proj, and attn-init copies Q/K/V whole (the paper's "full" copy); their g_proj / gk_proj /
g_norm are always fresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from megaxatl.config.schema import GATED_MLPS, ModelConfig, RopeScalingConfig
from megaxatl.config.pattern import ATTENTION_SYMBOLS, MIXERS

COPIES_MLP = {"emb+norm+mlp+oproj", "emb+norm+mlp", "attn-init"}
COPIES_OPROJ = {"emb+norm+mlp+oproj", "attn-init"}


class TransferError(ValueError):
    """The donor does not fit the target; raised before anything is written."""


@dataclass
class Copy:
    """target[index] <- transform(donor[source]). index=() is the whole parameter."""

    target: str
    source: str
    component: str
    index: tuple = ()
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    note: str = ""


@dataclass
class Plan:
    mode: str
    layer_map: list[int]
    copies: list[Copy]
    # canonical donor name -> reason it is not used
    dropped: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def default_layer_map(n_target: int, n_donor: int) -> list[int]:
    """Evenly spaced donor layers, first and last kept (identity when the depths are equal)."""
    if n_target > n_donor:
        raise TransferError(f"target has {n_target} layers but the donor only {n_donor}: give transfer.layer_map explicitly")
    if n_target == 1:
        return [0]
    return [round(i * (n_donor - 1) / (n_target - 1)) for i in range(n_target)]


def _slice_numel(shape: tuple[int, ...], index: tuple) -> int:
    n = 1
    for dim, size in enumerate(shape):
        if dim < len(index):
            start, stop, _ = index[dim].indices(size)
            n *= max(0, stop - start)
        else:
            n *= size
    return n


def check_compatible(spec, cfg: ModelConfig, mode: str) -> list[str]:
    """Fail on anything that would make a copy wrong; return warnings for what only differs."""

    def need(ok: bool, what: str, target, donor) -> None:
        if not ok:
            raise TransferError(f"donor {what} is {donor} but the target config has {target}")

    need(cfg.d_model == spec.d_model, "d_model", f"model.d_model={cfg.d_model}", spec.d_model)
    need(cfg.vocab_size == spec.vocab_size, "vocab_size (the target uses the donor's tokenizer)",
         f"model.vocab_size={cfg.vocab_size}", spec.vocab_size)
    need(cfg.norm == spec.norm, "norm", f"model.norm={cfg.norm!r}", repr(spec.norm))
    # the copied norms mean what they meant to the donor only where it had them, in its convention
    need(cfg.norm_placement == spec.norm_placement, "norm placement", f"model.norm_placement={cfg.norm_placement!r}",
         repr(spec.norm_placement))
    need(cfg.norm_unit_offset == spec.norm_unit_offset, "(1 + weight) norm convention",
         f"model.norm_unit_offset={cfg.norm_unit_offset}", spec.norm_unit_offset)
    if cfg.pos_embed:
        need(spec.has_pos_embed, "learned position embedding", "model.pos_embed=true", "absent")
        need(cfg.max_seq_len == spec.max_seq_len, "position embedding rows (max_seq_len)",
             f"model.max_seq_len={cfg.max_seq_len}", spec.max_seq_len)
    symbols = cfg.layer_symbols
    if mode in COPIES_MLP:
        need(cfg.mlp == spec.mlp, "MLP", f"model.mlp={cfg.mlp!r}", repr(spec.mlp))
        need(cfg.d_mlp == spec.d_mlp, "MLP width", f"model.d_mlp={cfg.d_mlp}", spec.d_mlp)
        need(cfg.mlp_bias == spec.mlp_bias, "MLP bias", f"model.mlp_bias={cfg.mlp_bias}", spec.mlp_bias)
    lin_attn = bool({"R", "G"} & set(symbols)) and mode in COPIES_OPROJ
    if lin_attn:
        need(cfg.n_heads * cfg.attn_head_dim == spec.n_heads * spec.head_dim, "n_heads * head_dim (W_O -> o_proj)",
             f"model.n_heads * head_dim={cfg.n_heads * cfg.attn_head_dim}", spec.n_heads * spec.head_dim)
        need(cfg.attn_out_bias == spec.attn_out_bias, "output-projection bias",
             f"model.attn_out_bias={cfg.attn_out_bias}", spec.attn_out_bias)
    has_attn = any(s in ATTENTION_SYMBOLS for s in symbols)
    if has_attn:
        need(cfg.qk_norm == spec.qk_norm, "q/k norm", f"model.qk_norm={cfg.qk_norm!r}", repr(spec.qk_norm))
    if has_attn or (lin_attn and mode == "attn-init"):
        need(cfg.n_heads == spec.n_heads, "n_heads", f"model.n_heads={cfg.n_heads}", spec.n_heads)
        need(cfg.kv_heads == spec.n_kv_heads, "KV heads", f"model.n_kv_heads={cfg.kv_heads}", spec.n_kv_heads)
        need(cfg.attn_head_dim == spec.head_dim, "head_dim", f"model.head_dim={cfg.attn_head_dim}", spec.head_dim)
        need(cfg.qkv_bias == spec.qkv_bias, "q/k/v bias", f"model.qkv_bias={cfg.qkv_bias}", spec.qkv_bias)
        need(cfg.attn_out_bias == spec.attn_out_bias, "output-projection bias",
             f"model.attn_out_bias={cfg.attn_out_bias}", spec.attn_out_bias)
    warnings = []
    rotates_qk = "*" in symbols or ("R" in symbols and mode == "attn-init")
    donor_scaling = RopeScalingConfig(**spec.rope_scaling) if spec.rope_scaling else RopeScalingConfig()
    if rotates_qk and (cfg.rotary_pct, cfg.rope_theta, cfg.rope_scaling) != (spec.rotary_pct, spec.rope_theta,
                                                                             donor_scaling):
        warnings.append(f"attention / retention layers use rotary_pct={cfg.rotary_pct}, rope_theta={cfg.rope_theta}, "
                        f"rope_scaling {cfg.rope_scaling.type!r} but the donor was trained with {spec.rotary_pct}, "
                        f"{spec.rope_theta}, {donor_scaling.type!r}")
    for key, ours, theirs in (("attn_scale", cfg.attn_scale, spec.attn_scale),
                              ("attn_softcap", cfg.attn_softcap, spec.attn_softcap)):
        if has_attn and ours != theirs:
            warnings.append(f"model.{key}={ours} differs from the donor's {theirs}")
    for key, ours, theirs in (("embed_scale", cfg.embed_scale, spec.embed_scale),
                              ("logit_scale", cfg.logit_scale, spec.logit_scale),
                              ("final_softcap", cfg.final_softcap, spec.final_softcap)):
        if ours != theirs:
            warnings.append(f"model.{key}={ours} differs from the donor's {theirs} (the copied embedding / head)")
    if mode == "attn-init":
        for sym, sub in (("R", cfg.retention), ("G", cfg.gla)):
            if sym in symbols and sub.n_heads not in (None, spec.n_heads):
                warnings.append(f"attn-init copies the donor's {spec.n_heads}-head Q/K/V into {sub.n_heads} "
                                f"{MIXERS[sym]} heads: same shapes, regrouped heads")
    if cfg.parallel_residual != spec.parallel_residual:
        warnings.append(f"model.parallel_residual={cfg.parallel_residual} differs from the donor's {spec.parallel_residual}")
    if cfg.norm_eps != spec.norm_eps:
        warnings.append(f"model.norm_eps={cfg.norm_eps} differs from the donor's {spec.norm_eps}")
    if cfg.mlp == "none" and mode in COPIES_MLP:
        warnings.append("the target has no MLP (model.mlp='none'): the donor's MLPs are dropped")
    return warnings


def _repeat_heads(n_heads: int, n_kv: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(KV*hd, D) -> (H*hd, D): each KV head repeated for its query group (GQA)."""

    def f(w: torch.Tensor) -> torch.Tensor:
        return w.view(n_kv, head_dim, -1).repeat_interleave(n_heads // n_kv, 0).reshape(n_heads * head_dim, -1)

    return f


def _mixer_copies(i: int, j: int, symbol: str, spec, cfg: ModelConfig, mode: str, shapes: dict) -> list[Copy]:
    """Copies into layer i's mixer from donor layer j."""
    tgt, src = f"layers.{i}.mixer", f"layers.{j}.mixer"
    kind = MIXERS[symbol]
    out: list[Copy] = []
    if symbol in ATTENTION_SYMBOLS:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append(Copy(f"{tgt}.{name}.weight", f"{src}.{name}.weight", "attention"))
            bias = spec.attn_out_bias if name == "o_proj" else spec.qkv_bias
            if bias:
                out.append(Copy(f"{tgt}.{name}.bias", f"{src}.{name}.bias", "attention"))
        if spec.qk_norm != "none":
            params = ["weight"] + (["bias"] if spec.norm == "layernorm" else [])
            out += [Copy(f"{tgt}.{n}.{p}", f"{src}.{n}.{p}", "attention") for n in ("q_norm", "k_norm") for p in params]
        return out
    if kind in ("retention", "gla"):
        if mode in COPIES_OPROJ:
            out.append(Copy(f"{tgt}.o_proj.weight", f"{src}.o_proj.weight", "oproj"))
            if spec.attn_out_bias:
                out.append(Copy(f"{tgt}.o_proj.bias", f"{src}.o_proj.bias", "oproj"))
        if mode == "attn-init":
            for name in ("q_proj", "k_proj", "v_proj"):
                out.append(Copy(f"{tgt}.{name}.weight", f"{src}.{name}.weight", "attn-init"))
                if spec.qkv_bias:
                    out.append(Copy(f"{tgt}.{name}.bias", f"{src}.{name}.bias", "attn-init"))
        return out
    if kind not in ("mamba", "mamba2"):
        raise TransferError(f"layer {i}: transfer into '{kind}' mixers is not supported yet")
    attn_width = spec.n_heads * spec.head_dim
    out_shape = shapes[f"{tgt}.out_proj.weight"]
    d_inner = out_shape[1]
    if mode in COPIES_OPROJ:
        if d_inner < attn_width:
            raise TransferError(f"{tgt}.out_proj.weight {tuple(out_shape)} is narrower than the donor's "
                                f"{src}.o_proj.weight ({spec.d_model}, {attn_width}): raise the mixer's expand "
                                f"so d_inner >= {attn_width}, or use mode 'emb+norm+mlp'")
        note = "" if d_inner == attn_width else f"columns 0..{attn_width - 1} of {d_inner}; the rest fresh"
        out.append(Copy(f"{tgt}.out_proj.weight", f"{src}.o_proj.weight", "oproj",
                        (slice(None), slice(0, attn_width)), note=note))
        if spec.attn_out_bias and f"{tgt}.out_proj.bias" in shapes:
            out.append(Copy(f"{tgt}.out_proj.bias", f"{src}.o_proj.bias", "oproj"))
    if mode == "attn-init":
        out += _attn_init_copies(tgt, src, kind, spec, cfg, d_inner)
    return out


def _attn_init_copies(tgt: str, src: str, kind: str, spec, cfg: ModelConfig, d_inner: int) -> list[Copy]:
    """MambaInLlama: V -> x, K -> B, Q -> C (GQA by repeating KV heads)."""
    H, KV, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    width = H * hd
    if d_inner < width:
        raise TransferError(f"attn-init: {tgt} has d_inner {d_inner} < the donor's n_heads*head_dim {width}")
    rep = _repeat_heads(H, KV, hd)
    out = [Copy(f"{tgt}.in_proj.weight", f"{src}.v_proj.weight", "attn-init",
                # Mamba-1 packs [x; z], Mamba-2 [z, x, B, C, dt]: x starts at 0 or d_inner
                (slice(0 if kind == "mamba" else d_inner, (0 if kind == "mamba" else d_inner) + width),),
                rep, note="V -> x (KV heads repeated)" if KV != H else "V -> x")]
    if kind == "mamba":
        return out  # B and C come from x_proj(conv(x)), not from the residual stream: no donor counterpart
    n_groups, d_state = cfg.mamba2.n_groups, cfg.mamba2.d_state
    if d_state != hd or n_groups != H:
        raise TransferError(f"attn-init into Mamba-2 needs mamba2.d_state == head_dim ({hd}) and "
                            f"mamba2.n_groups == n_heads ({H}) so K -> B and Q -> C fit; got d_state {d_state}, "
                            f"n_groups {n_groups}")
    b0 = 2 * d_inner
    out.append(Copy(f"{tgt}.in_proj.weight", f"{src}.k_proj.weight", "attn-init", (slice(b0, b0 + width),), rep,
                    note="K -> B"))
    out.append(Copy(f"{tgt}.in_proj.weight", f"{src}.q_proj.weight", "attn-init",
                    (slice(b0 + width, b0 + 2 * width),), note="Q -> C"))
    return out


def make_plan(spec, cfg: ModelConfig, target_shapes: dict[str, tuple], donor_keys: list[str],
              mode: str, layer_map: list[int] | None = None) -> Plan:
    """Build and fully validate the plan; no tensor data is read here."""
    warnings = check_compatible(spec, cfg, mode)
    symbols = cfg.layer_symbols
    lmap = list(layer_map) if layer_map is not None else default_layer_map(len(symbols), spec.n_layers)
    if len(lmap) != len(symbols):
        raise TransferError(f"transfer.layer_map has {len(lmap)} entries but the target has {len(symbols)} layers")
    bad = [j for j in lmap if not 0 <= j < spec.n_layers]
    if bad:
        raise TransferError(f"transfer.layer_map names donor layer {bad[0]} but the donor has {spec.n_layers} layers")

    _check_attention_kinds(spec, cfg, symbols, lmap)
    copies = [Copy("embed.weight", "embed.weight", "embedding", (slice(0, spec.vocab_size),))]
    if "pos_embed.weight" in target_shapes:
        copies.append(Copy("pos_embed.weight", "pos_embed.weight", "embedding"))
    if "lm_head.weight" in target_shapes:
        # an untied target takes the donor's head, or its embedding when the donor is tied
        src = "embed.weight" if spec.tie_embeddings else "lm_head.weight"
        copies.append(Copy("lm_head.weight", src, "head", (slice(0, spec.vocab_size),)))
    norm_params = ["weight"] + (["bias"] if spec.norm == "layernorm" else [])
    copies += [Copy(f"norm_f.{p}", f"norm_f.{p}", "norm") for p in norm_params]
    for i, (s, j) in enumerate(zip(symbols, lmap)):
        for n in ("norm1", "post_norm1", "norm2", "post_norm2"):
            if f"layers.{i}.{n}.weight" in target_shapes:
                copies += [Copy(f"layers.{i}.{n}.{p}", f"layers.{j}.{n}.{p}", "norm") for p in norm_params]
        if mode in COPIES_MLP and f"layers.{i}.mlp.up_proj.weight" in target_shapes:
            names = ["up_proj", "down_proj"] + (["gate_proj"] if spec.mlp in GATED_MLPS else [])
            for n in names:
                copies.append(Copy(f"layers.{i}.mlp.{n}.weight", f"layers.{j}.mlp.{n}.weight", "mlp"))
                if spec.mlp_bias:
                    copies.append(Copy(f"layers.{i}.mlp.{n}.bias", f"layers.{j}.mlp.{n}.bias", "mlp"))
        copies += _mixer_copies(i, j, s, spec, cfg, mode, target_shapes)

    keys = set(donor_keys)
    for c in copies:
        if c.target not in target_shapes:
            raise TransferError(f"plan names target {c.target}, which the model does not have")
        if c.source not in keys:
            raise TransferError(f"target {c.target} needs donor tensor {c.source}, which the donor does not have")
    used = {c.source for c in copies}
    lin_attn_src = {j for s, j in zip(symbols, lmap) if s in ("R", "G")}
    dropped = {k: _drop_reason(k, mode, lmap, spec, lin_attn_src) for k in donor_keys if k not in used}
    return Plan(mode, lmap, copies, dropped, warnings)


def _check_attention_kinds(spec, cfg: ModelConfig, symbols: list[str], lmap: list[int]) -> None:
    """A kept attention layer attends as the donor layer it copies: a full layer from a full one,
    a window from a window of the same size, with the same RoPE."""
    local = cfg.local_attention
    for i, (s, j) in enumerate(zip(symbols, lmap)):
        if s not in ATTENTION_SYMBOLS:
            continue
        theirs = spec.attention_symbol(j)
        if s != theirs:
            what = f"sliding-window (window {spec.sliding_window})" if theirs == "W" else "full"
            raise TransferError(f"target layer {i} is '{s}' but donor layer {j} is {what} attention: use '{theirs}' "
                                "in model.pattern")
        if s == "W":
            if local.window != spec.sliding_window:
                raise TransferError(f"donor sliding window is {spec.sliding_window} but the target config has "
                                    f"model.local_attention.window={local.window}")
            theta, scaling = cfg.rope_of("W")
            want_theta, want = spec.local_rope()
            want_scaling = RopeScalingConfig(**want) if want else RopeScalingConfig()
            if (theta, scaling) != (want_theta, want_scaling):
                raise TransferError(f"donor sliding layers use RoPE base {want_theta} / {want_scaling.type!r} but the "
                                    f"target's 'W' layers have {theta} / {scaling.type!r} (model.local_attention)")


def _drop_reason(key: str, mode: str, lmap: list[int], spec, lin_attn_src: set[int] = frozenset()) -> str:
    if key == "pos_embed.weight":
        return "learned position embedding: the target has no absolute positions"
    if key == "lm_head.weight":
        return "the target ties its head to the embedding"
    parts = key.split(".")
    if parts[0] == "layers" and int(parts[1]) not in lmap:
        return "donor layer not in the layer map"
    if ".mlp." in key:
        return f"mode '{mode}' does not copy MLPs" if mode not in COPIES_MLP else "the target has no MLP"
    if ".mixer." in key:
        if key.endswith(("o_proj.weight", "o_proj.bias")) and mode not in COPIES_OPROJ:
            return f"mode '{mode}' does not copy W_O"
        if int(parts[1]) in lin_attn_src and mode != "attn-init":
            return f"mode '{mode}' does not copy Q/K/V into retention / GLA (attn-init does)"
        return "attention projection with no counterpart in the target's mixer"
    if ".norm2." in key or ".post_norm2." in key:
        return "the target block has no MLP norm (no MLP)"
    return "no counterpart in the target"


def check_shapes(plan: Plan, target_shapes: dict, donor_shape: Callable[[str], tuple]) -> None:
    """Every copy's source (after its transform) must fit its target slice exactly."""
    for c in plan.copies:
        src = tuple(donor_shape(c.source))
        if c.transform is not None:
            src = tuple(c.transform(torch.empty(src, device="meta")).shape)
        tshape = tuple(target_shapes[c.target])
        want = tuple(len(range(*c.index[d].indices(tshape[d]))) if d < len(c.index) else tshape[d]
                     for d in range(len(tshape)))
        if src != want:
            raise TransferError(f"shape mismatch: donor {c.source} {src} does not fit target {c.target} "
                                f"{tshape}{' at ' + c.note if c.note else ''} (needs {want})")


def copied_numel(c: Copy, target_shapes: dict) -> int:
    return _slice_numel(tuple(target_shapes[c.target]), c.index)
