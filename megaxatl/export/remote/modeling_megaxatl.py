"""A megaxatl model (XATL blocks with attention, Mamba, Mamba-2, retention or GLA mixers) in plain
PyTorch, for `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

Written by `megaxatl export-hf` for layouts no stock transformers class reproduces exactly. It
imports only torch and transformers. Parameter names are megaxatl's own under `model.` (the
head is `lm_head.weight`, absent when tied), so `megaxatl import-hf` maps them back one to one.

Every block is: x + mixer(norm1(x)), then x + mlp(norm2(x)) (or GPT-NeoX's parallel form
x + mixer(norm1(x)) + mlp(norm2(x))), with the norms after the sublayers instead ('post') or on
both sides ('sandwich') where the config says so; a config without MLP has the mixer half only.
One symbol of the config's `pattern` per block names its mixer:

    *  softmax attention (partial rotary, GQA)     M  Mamba-1 selective SSM
    W  sliding-window softmax attention            S  Mamba-2 (SSD)
    R  retention (RetNet)                          G  gated linear attention

The norms, MLPs, RoPE (with its scalings) and softmax attention are in layers_megaxatl.py.

The scans here are the sequential reference recurrences (exact, O(L) per layer, not fused).
`generate` carries each layer's state between steps (`MegaxatlState`: the Mamba conv tail and SSM
state, the linear-attention matrix, the attention KV cache), so each new token costs one step
per layer, constant in the context length for the recurrent mixers. A strategy that reorders
rows between steps (beam search) is detected from the tokens and recomputes from the start.
Padding (attention_mask 0) is kept out of every state: no conv input, dt = 0 / no decay and no
write for the scans, no attention to it, so left-padded batched generation and right-padded
scoring give each row's unpadded result. For fast training, import the folder back with
`megaxatl import-hf` and use megaxatl's kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

try:  # transformers 5: init helpers that leave loaded weights alone
    from transformers import initialization as _init
except ImportError:  # transformers 4
    _init = nn.init

from .configuration_megaxatl import MegaxatlConfig
from .layers_megaxatl import (MLP, Attention, LayerNorm, RMSNorm, _Section, apply_rotary, lin_attn_heads, make_norm,
                              model_settings, real_positions, rope_of, rotary_at)


def causal_depthwise_conv(x: torch.Tensor, conv: nn.Conv1d, state: dict | None = None,
                          key: str = "conv") -> torch.Tensor:
    """x: (B, C, L) -> silu(causal depthwise conv(x)): output t sees inputs t-k+1 .. t. With
    `state`, the inputs before x are state[key] (the last k - 1, zeros at first), updated here."""
    k = conv.weight.shape[-1]
    if state is None:
        xin = F.pad(x, (k - 1, 0))
    else:
        prev = state.get(key)
        xin = torch.cat([prev, x], dim=-1) if prev is not None else F.pad(x, (k - 1, 0))
        state[key] = xin[..., xin.shape[-1] - (k - 1):]
    return F.silu(F.conv1d(xin, conv.weight, conv.bias, groups=x.shape[1]))


# ---- recurrent mixers ------------------------------------------------------------------------

class Mamba(nn.Module):
    """Mamba-1 (mamba-ssm layout): in_proj packs [x; z], depthwise causal conv, selective scan."""

    def __init__(self, cfg: _Section):
        super().__init__()
        m, D = cfg.mamba, cfg.d_model
        self.d_inner, self.d_state = int(m.expand * D), m.d_state
        self.dt_rank = m.dt_rank or math.ceil(D / 16)
        self.in_proj = nn.Linear(D, 2 * self.d_inner, bias=m.proj_bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, m.d_conv, groups=self.d_inner, bias=m.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * m.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(self.d_inner, m.d_state))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, D, bias=m.proj_bias)

    def forward(self, hidden: torch.Tensor, state: dict | None = None, offset: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """state: the conv tail and SSM state h (updated). At padding (mask 0) the conv input is
        zero and dt = 0, so the state passes through unchanged."""
        real = real_positions(mask, hidden.shape[1])
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        if real is not None:
            x = x * real.transpose(1, 2).to(x.dtype)
        x = causal_depthwise_conv(x, self.conv1d, state)
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())  # (B, L, d_inner)
        if real is not None:
            dt = dt * real
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        u, Bf, Cf = x.transpose(1, 2).float(), B.float(), C.float()
        h = state["h"] if state is not None and "h" in state else u.new_zeros(u.shape[0], self.d_inner, self.d_state)
        ys = []
        for t in range(u.shape[1]):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * Bf[:, t, None, :]
            ys.append((h * Cf[:, t, None, :]).sum(-1))
        if state is not None:
            state["h"] = h
        y = torch.stack(ys, dim=1) + self.D.float() * u
        y = y * F.silu(z.transpose(1, 2).float())
        return self.out_proj(y.to(hidden.dtype))


class GatedRMSNorm(nn.Module):
    """rmsnorm(y * silu(z)) over groups of `group_size` channels (mamba-ssm's norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = y.float() * F.silu(z.float())
        g = h.unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.float()).to(y.dtype)


class Mamba2(nn.Module):
    """Mamba-2 (mamba-ssm layout): in_proj packs [z; x B C; dt], conv over x B C, SSD scan, gated norm."""

    def __init__(self, cfg: _Section):
        super().__init__()
        m, D = cfg.mamba2, cfg.d_model
        self.d_inner = int(m.expand * D)
        self.d_state, self.head_dim, self.n_groups = m.d_state, m.head_dim, m.n_groups
        self.n_heads = self.d_inner // m.head_dim
        self.conv_dim = self.d_inner + 2 * m.n_groups * m.d_state
        self.in_proj = nn.Linear(D, self.d_inner + self.conv_dim + self.n_heads, bias=m.proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, m.d_conv, groups=self.conv_dim, bias=m.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // m.n_groups, cfg.mamba2_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, D, bias=m.proj_bias)

    def forward(self, hidden: torch.Tensor, state: dict | None = None, offset: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """state: the conv tail and SSM state h (updated); padding passes the state through."""
        bsz, seqlen, _ = hidden.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        real = real_positions(mask, seqlen)
        z, xbc, dt = torch.split(self.in_proj(hidden), [self.d_inner, self.conv_dim, H], dim=-1)
        if real is not None:
            xbc = xbc * real.to(xbc.dtype)
        xbc = causal_depthwise_conv(xbc.transpose(1, 2), self.conv1d, state).transpose(1, 2)
        x, B, C = torch.split(xbc, [self.d_inner, G * N, G * N], dim=-1)
        x = x.reshape(bsz, seqlen, H, P).float()
        # head h reads group h // (H / G)
        B = B.reshape(bsz, seqlen, G, N).float().repeat_interleave(H // G, dim=2)
        C = C.reshape(bsz, seqlen, G, N).float().repeat_interleave(H // G, dim=2)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, H)
        if real is not None:
            dt = dt * real
        A = -torch.exp(self.A_log.float())
        h = state["h"] if state is not None and "h" in state else x.new_zeros(bsz, H, P, N)
        ys = []
        for t in range(seqlen):
            decay = torch.exp(dt[:, t] * A)[:, :, None, None]
            h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append((h * C[:, t, :, None, :]).sum(-1))
        if state is not None:
            state["h"] = h
        y = torch.stack(ys, dim=1) + self.D.float()[:, None] * x
        y = self.norm(y.reshape(bsz, seqlen, self.d_inner).to(hidden.dtype), z)
        return self.out_proj(y)


def linear_attention(q, k, v, g, scale: float, cache: dict | None = None) -> torch.Tensor:
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = (scale q_t) S_t.

    q, k: (B, L, H, K); v: (B, L, H, V); g: (B, L, H, K) or (B, L, H, 1), log decays <= 0.
    Returns o (B, L, H, V) fp32. cache: S before q (zeros at first) in cache["S"], updated."""
    qf, kf, vf, gf = (t.float() for t in (q, k, v, g))
    bsz, seqlen, heads, dk = qf.shape
    state = cache["S"] if cache is not None and "S" in cache else qf.new_zeros(bsz, heads, dk, vf.shape[-1])
    outs = []
    for t in range(seqlen):
        state = state * gf[:, t].exp().unsqueeze(-1) + kf[:, t].unsqueeze(-1) * vf[:, t].unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t] * scale, state))
    if cache is not None:
        cache["S"] = state
    return torch.stack(outs, 1)


def retention_log_decay(n_heads: int, base: float, span: float | None, device=None) -> torch.Tensor:
    """log gamma_h, (H,) fp32: gamma_h = 1 - 2**(-base - h) (torchscale), or spread over `span`."""
    h = torch.arange(n_heads, dtype=torch.float64, device=device)
    expo = base + (h if span is None else h * span / max(n_heads - 1, 1))
    return torch.log1p(-torch.exp2(-expo)).float()


class Retention(nn.Module):
    """Multi-scale retention with the donor's rotary, a constant decay per head, a per-head
    LayerNorm without affine and a swish output gate."""

    def __init__(self, cfg: _Section):
        super().__init__()
        r, D = cfg.retention, cfg.d_model
        H, KV, hd = lin_attn_heads(cfg, r.n_heads)
        self.n_heads, self.n_kv_heads, self.head_dim = H, KV, hd
        self.rot_dim, self.max_seq_len = int(hd * cfg.rotary_pct), cfg.max_seq_len
        self.theta, self.scaling = rope_of(cfg, "*")
        self.norm_eps, self.decay_base, self.decay_span = r.norm_eps, r.decay_base, r.decay_span
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, KV * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, KV * hd, bias=cfg.qkv_bias)
        self.g_proj = nn.Linear(D, H * hd, bias=False) if r.gate else None
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.attn_out_bias)

    def forward(self, x: torch.Tensor, state: dict | None = None, offset: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Padding (mask 0) writes nothing into the state and does not decay it."""
        bsz, seqlen, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(bsz, seqlen, H, hd)
        k = self.k_proj(x).view(bsz, seqlen, KV, hd)
        v = self.v_proj(x).view(bsz, seqlen, KV, hd)
        cos, sin = rotary_at(self.rot_dim, self.theta, self.scaling, self.max_seq_len, offset, seqlen, x.device)
        q, k = apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None])
        if H != KV:
            k, v = k.repeat_interleave(H // KV, dim=2), v.repeat_interleave(H // KV, dim=2)
        g = retention_log_decay(H, self.decay_base, self.decay_span, x.device).view(1, 1, H, 1).expand(bsz, seqlen, H, 1)
        real = real_positions(mask, seqlen)
        if real is not None:
            g, k = g * real[..., None], k * real[..., None].to(k.dtype)
        o = linear_attention(q, k, v, g, hd ** -0.5, state)
        o = F.layer_norm(o, (hd,), eps=self.norm_eps)
        if self.g_proj is not None:
            o = F.silu(self.g_proj(x).float()).view(bsz, seqlen, H, hd) * o
        return self.o_proj(o.reshape(bsz, seqlen, H * hd).to(x.dtype))


class GLA(nn.Module):
    """Gated linear attention (flash-linear-attention's GatedLinearAttention layout): a low-rank
    data-dependent forget gate per key dim, RMSNorm per head, swish output gate, no positions."""

    def __init__(self, cfg: _Section):
        super().__init__()
        gc, D = cfg.gla, cfg.d_model
        H, KV, hd = lin_attn_heads(cfg, gc.n_heads)
        self.n_heads, self.n_kv_heads, self.head_dim = H, KV, hd
        self.norm_eps, self.gate_logit_normalizer = gc.norm_eps, gc.gate_logit_normalizer
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, KV * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, KV * hd, bias=cfg.qkv_bias)
        self.g_proj = nn.Linear(D, H * hd, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(D, gc.gate_low_rank_dim, bias=False),
                                     nn.Linear(gc.gate_low_rank_dim, KV * hd, bias=True))
        self.g_norm = nn.Module()
        self.g_norm.weight = nn.Parameter(torch.ones(hd))
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.attn_out_bias)

    def forward(self, x: torch.Tensor, state: dict | None = None, offset: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Padding (mask 0) writes nothing into the state and does not decay it."""
        bsz, seqlen, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        rep = H // KV
        q = self.q_proj(x).view(bsz, seqlen, H, hd)
        k = self.k_proj(x).view(bsz, seqlen, KV, hd).repeat_interleave(rep, dim=2)
        v = self.v_proj(x).view(bsz, seqlen, KV, hd).repeat_interleave(rep, dim=2)
        gk = F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer
        gk = gk.view(bsz, seqlen, KV, hd).repeat_interleave(rep, dim=2)
        real = real_positions(mask, seqlen)
        if real is not None:
            gk, k = gk * real[..., None], k * real[..., None].to(k.dtype)
        o = linear_attention(q, k, v, gk, hd ** -0.5, state)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.g_norm.weight.float()
        o = o * F.silu(self.g_proj(x).float()).view(bsz, seqlen, H, hd)
        return self.o_proj(o.reshape(bsz, seqlen, H * hd).to(x.dtype))


MIXERS = {"*": Attention, "W": Attention, "M": Mamba, "S": Mamba2, "R": Retention, "G": GLA}


# ---- blocks and the LM -------------------------------------------------------------------------

def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class MegaxatlBlock(nn.Module):
    """norm_placement 'pre': x + f(norm(x)); 'post': x + post_norm(f(x)); 'sandwich': both."""

    def __init__(self, symbol: str, cfg: _Section):
        super().__init__()
        if symbol not in MIXERS:
            raise ValueError(f"unknown mixer symbol {symbol!r} in pattern {cfg.pattern!r}")
        self.parallel_residual = cfg.parallel_residual
        pre, post = cfg.norm_placement in ("pre", "sandwich"), cfg.norm_placement in ("post", "sandwich")
        has_mlp = cfg.mlp != "none"

        def norm(present: bool):
            return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset) if present else None

        self.norm1 = norm(pre)
        self.mixer = Attention(cfg, symbol) if symbol in "*W" else MIXERS[symbol](cfg)
        self.post_norm1 = norm(post)
        self.norm2 = norm(pre and has_mlp)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.mlp, cfg.mlp_bias) if has_mlp else None
        self.post_norm2 = norm(post and has_mlp)

    def forward(self, x: torch.Tensor, state: dict | None = None, offset: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        n1, p1, n2, p2 = (m if m is not None else _identity
                          for m in (self.norm1, self.post_norm1, self.norm2, self.post_norm2))
        h = p1(self.mixer(n1(x), state, offset, mask))
        if self.mlp is None:
            return x + h
        if self.parallel_residual:
            return x + h + self.mlp(n2(x))
        x = x + h
        return x + p2(self.mlp(n2(x)))


def _copy(t: torch.Tensor, value: torch.Tensor) -> None:
    if not getattr(t, "_is_hf_initialized", False):  # never over a loaded tensor
        t.copy_(value)


class MegaxatlPreTrainedModel(PreTrainedModel):
    config_class = MegaxatlConfig
    base_model_prefix = "model"
    _no_split_modules = ["MegaxatlBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """Only for a model built from its config (from_pretrained loads every tensor)."""
        std = model_settings(self.config).init_std
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm) and module.unit_offset:
            _init.zeros_(module.weight)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            _init.ones_(module.weight)
        elif isinstance(module, LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)
        elif isinstance(module, GLA):
            _init.ones_(module.g_norm.weight)
        elif isinstance(module, Mamba):
            A = torch.arange(1, module.d_state + 1, dtype=torch.float32).repeat(module.d_inner, 1)
            _copy(module.A_log, torch.log(A))
            _init.ones_(module.D)
        elif isinstance(module, Mamba2):
            A = torch.arange(1, module.n_heads + 1, dtype=torch.float32)
            _copy(module.A_log, torch.log(A))
            _init.ones_(module.D)
            _init.zeros_(module.dt_bias)


class MegaxatlState:
    """What generation carries between steps: per layer a dict of its state (attention: k, v;
    Mamba: conv tail, h; retention / GLA: S), and the tokens already folded in (rows, seen)."""

    def __init__(self, n_layers: int):
        self.layers: list[dict] = [{} for _ in range(n_layers)]
        self.tokens: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # (rows, seen) attention mask so far; None: no padding

    @property
    def seen(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def continues(self, input_ids: torch.Tensor) -> bool:
        """Whether input_ids (B, T) extends exactly the tokens folded in, row by row."""
        return (self.tokens is not None and input_ids.shape[0] == self.tokens.shape[0]
                and input_ids.shape[1] > self.seen and bool((input_ids[:, :self.seen] == self.tokens).all()))


def _full_mask(attention_mask, state: MegaxatlState | None, seqlen: int) -> torch.Tensor | None:
    """The mask of every position folded in so far plus this call's (B, seen + L), or None when
    nothing is padding. Left padding (batched generation) and right padding (scoring) are exact:
    padding enters no recurrent state and no attention. A gap between real tokens is refused: a
    conv window would see it."""
    seen = state.seen if state is not None else 0
    past = state.mask if state is not None else None
    if attention_mask is None:
        new = None
    else:
        m = attention_mask.to(torch.long)
        if m.shape[1] == seen + seqlen:  # generate passes the whole sequence's mask
            past, new = (m[:, :seen] if seen else None), m[:, seen:]
        elif m.shape[1] == seqlen:
            new = m
        else:
            raise ValueError(f"attention_mask has {m.shape[1]} positions; expected {seqlen} or {seen + seqlen}")
    if past is None and new is None:
        return None
    rows = (new if new is not None else past).shape[0]
    device = (new if new is not None else past).device
    full = torch.cat([past if past is not None else torch.ones(rows, seen, dtype=torch.long, device=device),
                      new if new is not None else torch.ones(rows, seqlen, dtype=torch.long, device=device)], dim=1)
    starts = full[:, :1] + (full[:, 1:] - full[:, :-1] == 1).sum(-1, keepdim=True)
    if bool((starts > 1).any()):
        raise ValueError("attention_mask has padding between real tokens; only left padding (generation) and "
                         "right padding (scoring) are supported")
    return None if bool(full.all()) else full


@dataclass
class MegaxatlCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    megaxatl_state: MegaxatlState | None = None


class MegaxatlModel(MegaxatlPreTrainedModel):
    def __init__(self, config: MegaxatlConfig):
        super().__init__(config)
        cfg = model_settings(config)
        self.embed_scale = cfg.embed_scale
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_embed else None
        self.layers = nn.ModuleList(MegaxatlBlock(s, cfg) for s in cfg.symbols)
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids=None, inputs_embeds=None, state: "MegaxatlState | None" = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, L) -> final-normed hidden states (B, L, D). With `state`, the input
        continues the sequence folded into it (which this call extends). mask: (B, seen + L),
        0 at padding, or None."""
        if inputs_embeds is None:
            x = self.embed(input_ids)
            if self.embed_scale != 1.0:  # Gemma: sqrt(d_model), rounded to the weights' dtype
                x = x * torch.tensor(self.embed_scale, dtype=torch.float32).to(self.embed.weight.dtype)
        else:
            x = inputs_embeds
        offset = state.seen if state is not None else 0
        if self.pos_embed is not None:
            # a row's positions count its real tokens only, so left padding leaves them as unpadded
            pos = torch.arange(offset, offset + x.shape[1], device=x.device)[None]
            if mask is not None:
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -x.shape[1]:]
            if int(pos.max()) >= self.pos_embed.num_embeddings:
                raise ValueError(f"position {int(pos.max())} is past the {self.pos_embed.num_embeddings} learned "
                                 "positions")
            x = x + self.pos_embed(pos)
        for i, layer in enumerate(self.layers):
            x = layer(x, state.layers[i] if state is not None else None, offset, mask)
        return self.norm_f(x)


class MegaxatlForCausalLM(MegaxatlPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: MegaxatlConfig):
        super().__init__(config)
        cfg = self._settings = model_settings(config)
        self.model = MegaxatlModel(config)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is ours (MegaxatlState), not a transformers Cache

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None,
                                      megaxatl_state=None, use_cache=True, **kwargs):
        """Feed only the tokens the state has not seen. A state the rows no longer continue (beam
        search reorders rows) is dropped and the whole sequence is read again."""
        if not use_cache or (inputs_embeds is not None and megaxatl_state is None):
            return {"input_ids": None if inputs_embeds is not None else input_ids, "inputs_embeds": inputs_embeds,
                    "attention_mask": attention_mask}
        state = megaxatl_state if megaxatl_state is not None and megaxatl_state.continues(input_ids) else None
        if state is None:
            state = MegaxatlState(len(self.model.layers))
        return {"input_ids": input_ids[:, state.seen:], "attention_mask": attention_mask, "megaxatl_state": state}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["megaxatl_state"] = getattr(outputs, "megaxatl_state", None)
        return model_kwargs

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, logits_to_keep=0,
                return_dict=None, megaxatl_state: MegaxatlState | None = None, **kwargs):
        """megaxatl_state: continue the sequence folded into it (input_ids only: the new tokens)
        and extend it; returned as `megaxatl_state`."""
        if megaxatl_state is not None and input_ids is None:
            raise ValueError("megaxatl_state needs input_ids (it records the tokens it has folded in)")
        seqlen = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        mask = _full_mask(attention_mask, megaxatl_state, seqlen)
        hidden = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, state=megaxatl_state, mask=mask)
        if megaxatl_state is not None:
            seen = megaxatl_state.tokens
            megaxatl_state.tokens = input_ids if seen is None else torch.cat([seen, input_ids], dim=1)
            megaxatl_state.mask = mask
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        cfg = self._settings
        if cfg.logit_scale != 1.0:
            logits = logits * cfg.logit_scale
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if megaxatl_state is not None:
            return MegaxatlCausalLMOutput(loss=loss, logits=logits, megaxatl_state=megaxatl_state)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
