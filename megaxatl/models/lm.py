"""The decoder LM: embedding -> blocks from the pattern -> final norm -> LM head.

A plain single-device `nn.Module` (forward(input_ids) -> logits); parallelism is applied to it
afterwards (megaxatl/parallel), torchtitan style. What some donors add around the blocks, each
off by default: a constant embedding scale (Gemma), a learned position embedding (GPT-2), a
logit scale and tanh soft-capping of the logits (Gemma-2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaxatl.config.schema import ModelConfig
from megaxatl.models.block import Block
from megaxatl.models.norms import make_norm
from megaxatl.models.params import mark_no_decay

# Projections that write into the residual stream: scaled down at init by 1/sqrt(2 * n_layers)
# (GPT-2 / Megatron / mamba-ssm's rescale_prenorm_residual), so the stream's variance does not
# grow with depth.
RESIDUAL_OUT = ("o_proj", "out_proj", "down_proj")


class TokenEmbedding(nn.Embedding):
    """nn.Embedding whose rows are multiplied by `scale` (Gemma: sqrt(d_model)), the constant
    rounded to float32 and then to the weights' dtype, as Gemma's reference does."""

    def __init__(self, num: int, dim: int, scale: float = 1.0):
        super().__init__(num, dim)
        self.scale = scale

    def scaled(self, rows: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return rows
        return rows * torch.tensor(self.scale, dtype=torch.float32).to(self.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.scaled(super().forward(ids))


class LMCache(list):
    """Per-layer decode caches (list order = layers) and `pos`: the tokens already folded in."""

    def __init__(self, layers=(), pos: int = 0):
        super().__init__(layers)
        self.pos = pos


def project_logits(cfg: ModelConfig, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight^T, then the logit scale and the final soft-cap (elementwise, so a vocab
    shard of the logits gets the same treatment as the whole)."""
    out = F.linear(hidden, weight)
    if cfg.logit_scale != 1.0:
        out = out * cfg.logit_scale
    if cfg.final_softcap is not None:
        out = torch.tanh(out / cfg.final_softcap) * cfg.final_softcap
    return out


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.padded_vocab_size
        self.embed = TokenEmbedding(vocab, cfg.d_model, cfg.embed_scale)
        mark_no_decay(self.embed.weight)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_embed else None
        if self.pos_embed is not None:
            mark_no_decay(self.pos_embed.weight)
        self.layers = nn.ModuleList(Block(s, cfg) for s in cfg.layer_symbols)
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, vocab, bias=False)
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Generic init from the global RNG, in module order (see init_unit_ for what it sets)."""
        init_unit_(self.cfg, "embed", self.embed)
        if self.pos_embed is not None:
            init_unit_(self.cfg, "pos_embed", self.pos_embed)
        if self.lm_head is not None:
            init_unit_(self.cfg, "lm_head", self.lm_head)
        for i, layer in enumerate(self.layers):
            init_unit_(self.cfg, f"layers.{i}", layer)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def empty_cache(self, batch: int, device=None, dtype=None) -> LMCache:
        p = self.embed.weight
        return LMCache(layer.empty_cache(batch, device or p.device, dtype or p.dtype) for layer in self.layers)

    def add_positions(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x (B, L, D) at positions start .. start + L - 1, plus the learned position embedding."""
        if self.pos_embed is None:
            return x
        end = start + x.shape[1]
        if end > self.cfg.max_seq_len:
            raise ValueError(f"position {end - 1} is past the learned position embedding's "
                             f"model.max_seq_len {self.cfg.max_seq_len} rows")
        return x + self.pos_embed(torch.arange(start, end, device=x.device))

    def hidden_states(self, input_ids: torch.Tensor, cache: list | None = None):
        """input_ids: (B, L) -> final-normed hidden (B, L, D) and the updated cache (or None)."""
        start = getattr(cache, "pos", 0)
        x = self.add_positions(self.embed(input_ids), start)
        new_cache = LMCache(pos=start + input_ids.shape[1]) if cache is not None else None
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x, c = layer(x, cache[i])
                new_cache.append(c)
            elif self.gradient_checkpointing and self.training:
                x = checkpoint(lambda t, layer=layer: layer(t)[0], x, use_reentrant=False)
            else:
                x, _ = layer(x)
        return self.norm_f(x), new_cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = project_logits(self.cfg, hidden, self.head_weight)
        # padded vocab rows exist for TP / kernels only; they are never predicted
        return out[..., : self.cfg.vocab_size] if out.shape[-1] != self.cfg.vocab_size else out

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's part of the logits: all of them here (a TP model: its vocab shard)."""
        return self.logits(hidden)

    def forward(self, input_ids: torch.Tensor, cache: list | None = None, labels: torch.Tensor | None = None,
                local: bool = False):
        """input_ids: (B, L) -> logits (B, L, vocab). With `cache` -> (logits, new cache). With
        `labels` -> the loss (so a wrapper such as DeepSpeed's engine reaches `loss`, which under
        tensor parallelism never gathers the full logits). local: local_logits instead (the
        distillation loss works on them, through the engine as the loss does)."""
        if labels is not None:
            return self.loss(input_ids, labels)
        if local:
            return self.local_logits(self.hidden_states(input_ids)[0])
        hidden, new_cache = self.hidden_states(input_ids, cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross entropy in fp32; labels (B, L) are already shifted."""
        logits = self.logits(self.hidden_states(input_ids)[0])
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)


def build(cfg, seed: int | None = None) -> LM:
    """megaxatl.models.build(config) -> model. Accepts a full `Config` or its `ModelConfig`.

    seed: initialise every unit from (seed, its global name) (build_unit), the values any layout
    materialises (train/init.py); None: the plain global-RNG init in module order."""
    model_cfg = getattr(cfg, "model", cfg)
    if seed is None:
        return LM(model_cfg)
    with torch.device("meta"):
        model = LM(model_cfg)
    for name in unit_names(model_cfg):
        ref = build_unit(model_cfg, name, seed)
        if name.startswith("layers."):
            model.layers[int(name[7:])] = ref
        else:
            setattr(model, name, ref)
    return model


# ---- layout-free initialisation: one unit at a time, from (seed, its global name) ---------------
#
# A unit is the embedding, the learned positions, one block, the final norm or the LM head. Its values come from a
# generator seeded by (seed, unit name) alone, so they are the same whatever the tensor / pipeline
# layout, whichever rank builds them and in whatever order: a TP 2 x PP 2 rank builds only the
# units of its stage (each one whole, then keeps its TP part), and gathering the parts gives the
# TP 1 model bit for bit. (The mixers' own init, dt / A_log / D / conv, runs in their constructors
# from the global RNG, which is why the unit is built under its own seed, not each tensor.)

def unit_names(cfg) -> list[str]:
    cfg = getattr(cfg, "model", cfg)
    names = ["embed"] + (["pos_embed"] if cfg.pos_embed else []) + [f"layers.{i}" for i in range(cfg.n_layers)]
    names.append("norm_f")
    return names if cfg.tie_embeddings else names + ["lm_head"]


def unit_of(name: str) -> str:
    """The unit a global parameter / buffer name belongs to ('layers.3.mixer.A_log' -> 'layers.3')."""
    head, _, rest = name.partition(".")
    return f"{head}.{rest.split('.', 1)[0]}" if head == "layers" else head


def unit_seed(seed: int, unit: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"megaxatl-init:{seed}:{unit}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def init_unit_(cfg: ModelConfig, unit: str, module: nn.Module) -> None:
    """Generic init of one unit in place: N(0, init_std) linears and embedding, zero biases,
    residual outputs scaled by 1/sqrt(2 * n_layers). Mixer-specific parameters (dt_proj, A_log, D,
    conv) keep their constructors' init (reset_ssm_parameters); norms keep ones / zeros."""
    std = cfg.init_std
    if unit in ("embed", "pos_embed", "lm_head"):
        nn.init.normal_(module.weight, std=std)
        return
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "dt_proj":
                continue
            scale = 1 / math.sqrt(2 * cfg.n_layers) if leaf in RESIDUAL_OUT else 1.0
            nn.init.normal_(m.weight, std=std * scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_unit(cfg, unit: str, seed: int, device="cpu") -> nn.Module:
    """One whole unit (full size), initialised from (seed, unit) alone; the global RNG is untouched."""
    cfg = getattr(cfg, "model", cfg)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(unit_seed(seed, unit))
        # each unit exactly as LM.__init__ builds it (same classes, same constructor init)
        if unit == "embed":
            module = TokenEmbedding(cfg.padded_vocab_size, cfg.d_model, cfg.embed_scale)
            mark_no_decay(module.weight)
        elif unit == "pos_embed" and cfg.pos_embed:
            module = nn.Embedding(cfg.max_seq_len, cfg.d_model)
            mark_no_decay(module.weight)
        elif unit == "lm_head":
            module = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        elif unit == "norm_f":
            module = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)
        elif unit.startswith("layers."):
            module = Block(cfg.layer_symbols[int(unit[7:])], cfg)
        else:
            raise ValueError(f"unknown model unit {unit!r}")
        init_unit_(cfg, unit, module)
    return module


def count_parameters(cfg) -> int:
    """Exact parameter count of a config, without allocating it (built on the meta device)."""
    with torch.device("meta"):
        model = build(cfg)
    return sum(p.numel() for p in model.parameters())
