"""Donor readers: every family and file format -> the canonical state, bit-exact; strict errors.

Ground truth is the HF module the tiny donor was saved from: its parameters (sliced here with code
written independently of the readers' tables) and its logits (a small canonical forward pass below
must reproduce them from the canonical tensors and the spec alone).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures_donors import (FAMILIES, FORMATS, MAX_WINDOW, ROPE_SCALINGS, build_tiny_model, make_tiny_donor,
                             make_tiny_gguf, write_tiny_tokenizer)
from helpers import assert_close
from megaxatl.donors import DonorError, DonorSpec, canonical_shapes, open_donor

# ------------------------------------------------------------------------------------------------
# ground truth from the HF module


def expected_spec(family: str, cfg) -> dict:
    """The DonorSpec fields a reader must derive from an HF config object (read off its attributes)."""
    if family == "gpt2":
        D, H = cfg.n_embd, cfg.n_head
        return dict(family="gpt2", vocab_size=cfg.vocab_size, d_model=D, n_layers=cfg.n_layer, n_heads=H,
                    n_kv_heads=H, head_dim=D // H, rotary_pct=0.0, rope_theta=0.0, norm="layernorm",
                    norm_eps=cfg.layer_norm_epsilon, mlp="gelu_tanh", d_mlp=cfg.n_inner or 4 * D, mlp_bias=True,
                    qkv_bias=True, attn_out_bias=True, parallel_residual=False, tie_embeddings=True,
                    max_seq_len=cfg.n_positions, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                    dtype="float32", has_pos_embed=True)
    D, H = cfg.hidden_size, cfg.num_attention_heads
    common = dict(family=family, vocab_size=cfg.vocab_size, d_model=D, n_layers=cfg.num_hidden_layers, n_heads=H,
                  rope_theta=cfg.rope_parameters["rope_theta"], d_mlp=cfg.intermediate_size,
                  tie_embeddings=cfg.tie_word_embeddings, max_seq_len=cfg.max_position_embeddings,
                  bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, dtype="float32",
                  has_pos_embed=False)
    if family == "gpt_neox":
        return dict(common, n_kv_heads=H, head_dim=D // H,
                    rotary_pct=cfg.rope_parameters["partial_rotary_factor"], norm="layernorm",
                    norm_eps=cfg.layer_norm_eps, mlp="gelu", mlp_bias=True, qkv_bias=True, attn_out_bias=True,
                    parallel_residual=cfg.use_parallel_residual)
    return dict(common, n_kv_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None) or D // H,
                rotary_pct=1.0, norm="rmsnorm",
                norm_eps=cfg.rms_norm_eps, mlp="swiglu", mlp_bias=False, qkv_bias=family == "qwen2",
                attn_out_bias=False, parallel_residual=False)


def expected_tensors(family: str, model) -> dict[str, tuple[str, torch.Tensor]]:
    """canonical name -> (original key, tensor) taken from the HF module's own parameters."""
    sd = model.state_dict()
    cfg = model.config
    out: dict[str, tuple[str, torch.Tensor]] = {}

    def put(name, key, t=None, module_key=None):
        out[name] = (key, sd[module_key or key] if t is None else t)

    if family == "gpt_neox":
        H = cfg.num_attention_heads
        hd = cfg.hidden_size // H
        put("embed.weight", "gpt_neox.embed_in.weight")
        for i in range(cfg.num_hidden_layers):
            p, c = f"gpt_neox.layers.{i}.", f"layers.{i}."
            for kind in ("weight", "bias"):
                put(c + f"norm1.{kind}", p + f"input_layernorm.{kind}")
                put(c + f"norm2.{kind}", p + f"post_attention_layernorm.{kind}")
                fused = p + f"attention.query_key_value.{kind}"
                # HF: qkv(x).view(..., H, 3 * hd).chunk(3, -1): per head, rows [q | k | v]
                per_head = sd[fused].reshape(H, 3 * hd, -1)
                for j, n in enumerate("qkv"):
                    part = per_head[:, j * hd:(j + 1) * hd].reshape(H * hd, -1)
                    put(c + f"mixer.{n}_proj.{kind}", fused, part.squeeze(-1) if kind == "bias" else part)
                put(c + f"mixer.o_proj.{kind}", p + f"attention.dense.{kind}")
                put(c + f"mlp.up_proj.{kind}", p + f"mlp.dense_h_to_4h.{kind}")
                put(c + f"mlp.down_proj.{kind}", p + f"mlp.dense_4h_to_h.{kind}")
        put("norm_f.weight", "gpt_neox.final_layer_norm.weight")
        put("norm_f.bias", "gpt_neox.final_layer_norm.bias")
        put("lm_head.weight", "embed_out.weight", module_key="lm_head.weight")  # transformers 5 renames it
    elif family == "gpt2":
        D = cfg.n_embd
        put("embed.weight", "transformer.wte.weight")
        put("pos_embed.weight", "transformer.wpe.weight")
        for i in range(cfg.n_layer):
            p, c = f"transformer.h.{i}.", f"layers.{i}."
            for kind in ("weight", "bias"):
                put(c + f"norm1.{kind}", p + f"ln_1.{kind}")
                put(c + f"norm2.{kind}", p + f"ln_2.{kind}")
            # HF: c_attn(x) = x @ W + b, then .split(D, dim=2) -> q, k, v
            w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
            for n, wq, bq in zip("qkv", w.split(D, dim=1), b.split(D)):
                put(c + f"mixer.{n}_proj.weight", p + "attn.c_attn.weight", wq.T)
                put(c + f"mixer.{n}_proj.bias", p + "attn.c_attn.bias", bq)
            put(c + "mixer.o_proj.weight", p + "attn.c_proj.weight", sd[p + "attn.c_proj.weight"].T)
            put(c + "mixer.o_proj.bias", p + "attn.c_proj.bias")
            put(c + "mlp.up_proj.weight", p + "mlp.c_fc.weight", sd[p + "mlp.c_fc.weight"].T)
            put(c + "mlp.up_proj.bias", p + "mlp.c_fc.bias")
            put(c + "mlp.down_proj.weight", p + "mlp.c_proj.weight", sd[p + "mlp.c_proj.weight"].T)
            put(c + "mlp.down_proj.bias", p + "mlp.c_proj.bias")
        put("norm_f.weight", "transformer.ln_f.weight")
        put("norm_f.bias", "transformer.ln_f.bias")
    else:
        put("embed.weight", "model.embed_tokens.weight")
        for i in range(cfg.num_hidden_layers):
            p, c = f"model.layers.{i}.", f"layers.{i}."
            put(c + "norm1.weight", p + "input_layernorm.weight")
            put(c + "norm2.weight", p + "post_attention_layernorm.weight")
            for n in "qkvo":
                put(c + f"mixer.{n}_proj.weight", p + f"self_attn.{n}_proj.weight")
                if p + f"self_attn.{n}_proj.bias" in sd:
                    put(c + f"mixer.{n}_proj.bias", p + f"self_attn.{n}_proj.bias")
            for n in ("gate", "up", "down"):
                put(c + f"mlp.{n}_proj.weight", p + f"mlp.{n}_proj.weight")
        put("norm_f.weight", "model.norm.weight")
        if not cfg.tie_word_embeddings:
            put("lm_head.weight", "lm_head.weight")
    return out


# the families read through transformers' newer modeling code: which HF submodule of a layer
# each canonical module is (read off that code, not off our tables), and the facts that set them apart
OLD_FAMILIES = ("gpt_neox", "llama", "qwen2", "mistral", "gpt2")
_ATTN = {f"mixer.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj": f"mlp.{p}_proj"
                                                                      for p in ("gate", "up", "down")}
_QK = {"mixer.q_norm": "self_attn.q_norm", "mixer.k_norm": "self_attn.k_norm"}
_PRE = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"}
_SANDWICH = {"norm1": "input_layernorm", "post_norm1": "post_attention_layernorm",
             "norm2": "pre_feedforward_layernorm", "post_norm2": "post_feedforward_layernorm"}
NEWER_MODULES = {
    "qwen3": _ATTN | _PRE | _QK, "gemma": _ATTN | _PRE, "gemma2": _ATTN | _SANDWICH,
    "gemma3_text": _ATTN | _SANDWICH | _QK, "phi3": _ATTN | _PRE, "stablelm": _ATTN | _PRE,
    "olmo2": _ATTN | _QK | {"post_norm1": "post_attention_layernorm", "post_norm2": "post_feedforward_layernorm"},
}
NEWER_FACTS = {
    "qwen3": dict(qk_norm="head", sliding_window=6, sliding_layers=(1, 2), rope_theta=1e6, qkv_bias=False),
    "gemma": dict(norm_unit_offset=True, embed_scale=8.0, mlp="geglu_tanh", n_kv_heads=1, tie_embeddings=True),
    "gemma2": dict(norm_placement="sandwich", attn_scale=24 ** -0.5, attn_softcap=5.0, final_softcap=3.0,
                   sliding_window=5, sliding_layers=(0, 2), head_dim=32),
    "gemma3_text": dict(norm_placement="sandwich", qk_norm="head", sliding_layers=(0, 1, 3), attn_scale=None,
                        rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}, local_rope_theta=10000.0,
                        local_rope_scaling={"type": "none"}),
    "phi3": dict(rotary_pct=0.5, sliding_window=MAX_WINDOW, sliding_layers=(0, 1), mlp="swiglu"),
    "olmo2": dict(norm_placement="post", qk_norm="full", norm="rmsnorm"),
    "stablelm": dict(norm="layernorm", rotary_pct=0.25, qkv_bias=True, attn_out_bias=False, mlp_bias=False),
}


def newer_tensors(family: str, model) -> dict[str, tuple[str, torch.Tensor]]:
    """canonical name -> (original key, tensor) of a newer family, from the HF module's parameters."""
    sd, cfg = model.state_dict(), model.config
    out = {"embed.weight": ("model.embed_tokens.weight", sd["model.embed_tokens.weight"])}
    for kind in ("weight", "bias"):
        if f"model.norm.{kind}" in sd:
            out[f"norm_f.{kind}"] = (f"model.norm.{kind}", sd[f"model.norm.{kind}"])
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", sd["lm_head.weight"])
    modules = NEWER_MODULES[family]
    for key, t in sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            continue
        i, sub, kind = m.groups()
        if sub == "self_attn.qkv_proj":  # Phi-3: q rows, then k, then v
            hd = cfg.hidden_size // cfg.num_attention_heads
            q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
            for n, part in zip("qkv", t.split([q, kv, kv])):
                out[f"layers.{i}.mixer.{n}_proj.{kind}"] = (key, part)
        elif sub == "mlp.gate_up_proj":  # Phi-3: chunk(2) -> gate, up
            for n, part in zip(("gate", "up"), t.chunk(2)):
                out[f"layers.{i}.mlp.{n}_proj.{kind}"] = (key, part)
        else:
            ours = next(o for o, h in modules.items() if h == sub)
            out[f"layers.{i}.{ours}.{kind}"] = (key, t)
    return out


def file_keys(donor) -> set[str]:
    """Every tensor key stored in the donor's files, read with the formats' own libraries."""
    keys: set[str] = set()
    for f in donor.files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as h:
                keys |= set(h.keys())
        else:
            keys |= set(torch.load(f, weights_only=True))
    return keys


# ------------------------------------------------------------------------------------------------
# a canonical forward pass: the spec + canonical tensors alone must reproduce the donor's logits


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def canonical_forward(spec: DonorSpec, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    H, KV, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim

    def lin(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def norm(x, name):
        if spec.norm == "layernorm":
            return F.layer_norm(x, (spec.d_model,), sd[f"{name}.weight"], sd[f"{name}.bias"], spec.norm_eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.norm_eps) * sd[f"{name}.weight"]

    def rope(x):  # (B, heads, T, hd), rotate_half convention on the first rotary_dim dims
        rd = int(hd * spec.rotary_pct)
        if rd == 0:
            return x
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
        freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        xr, xp = x[..., :rd], x[..., rd:]
        return torch.cat((xr * emb.cos() + _rotate_half(xr) * emb.sin(), xp), dim=-1)

    def attn(x, p):
        q = lin(x, p + "mixer.q_proj").view(B, T, H, hd).transpose(1, 2)
        k = lin(x, p + "mixer.k_proj").view(B, T, KV, hd).transpose(1, 2)
        v = lin(x, p + "mixer.v_proj").view(B, T, KV, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
        return lin(o, p + "mixer.o_proj")

    def mlp(x, p):
        if spec.mlp == "swiglu":
            return lin(F.silu(lin(x, p + "mlp.gate_proj")) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")
        act = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}[spec.mlp]
        return lin(act(lin(x, p + "mlp.up_proj")), p + "mlp.down_proj")

    x = sd["embed.weight"][ids]
    if spec.has_pos_embed:
        x = x + sd["pos_embed.weight"][:T]
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        a = attn(norm(x, p + "norm1"), p)
        if spec.parallel_residual:
            x = x + a + mlp(norm(x, p + "norm2"), p)
        else:
            x = x + a
            x = x + mlp(norm(x, p + "norm2"), p)
    x = norm(x, "norm_f")
    return F.linear(x, sd["embed.weight"] if spec.tie_embeddings else sd["lm_head.weight"])


# ------------------------------------------------------------------------------------------------
# every family x every format


# the file formats are family-independent: two of them cover the newer families
@pytest.mark.parametrize("family,fmt", [(f, fmt) for f in FAMILIES for fmt in FORMATS
                                        if f in OLD_FAMILIES or fmt in ("safetensors", "sharded_bin")])
def test_reader_is_bit_exact_and_accounts_for_every_tensor(tmp_path, family, fmt):
    hf, path = make_tiny_donor(family, tmp_path / family, fmt=fmt)
    donor = open_donor(path)

    if family in OLD_FAMILIES:
        assert donor.spec == DonorSpec(**expected_spec(family, hf.config))
        expected = expected_tensors(family, hf)
    else:
        got = donor.spec.to_dict()
        assert {k: got[k] for k in NEWER_FACTS[family]} == NEWER_FACTS[family]
        expected = newer_tensors(family, hf)
    assert donor.format == ("bin" if "bin" in fmt else "safetensors")
    n_files = {"safetensors": 1, "bin": 1, "sharded_bin": 3}.get(fmt)
    assert len(donor.files) == n_files if n_files else len(donor.files) > 1

    assert donor.keys() == list(canonical_shapes(donor.spec))  # stable, documented order
    assert set(donor.keys()) == set(expected)
    for name in donor.keys():
        key, want = expected[name]
        got = donor.get(name)
        assert donor.shape(name) == tuple(got.shape) == tuple(want.shape), name
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert donor.source(name) == key, name
        assert donor.source_file(name) in donor.files

    # nothing silent: every stored tensor is a source or a recorded drop
    sources = {donor.source(n) for n in donor.keys()}
    assert sources | set(donor.dropped) == file_keys(donor)
    assert not sources & set(donor.dropped)


@pytest.mark.parametrize("family", OLD_FAMILIES)  # the newer ones: test_transfer's all-attention parity
def test_canonical_state_reproduces_donor_logits(tmp_path, family):
    hf, path = make_tiny_donor(family, tmp_path / family)
    donor = open_donor(path)
    ids = torch.randint(0, donor.spec.vocab_size, (2, 19))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = canonical_forward(donor.spec, donor.state_dict(), ids)
    assert_close(ours, ref, 1e-5, f"{family} canonical forward vs HF")


def test_neox_sequential_residual_and_relu(tmp_path):
    hf, path = make_tiny_donor("gpt_neox", tmp_path / "neox", use_parallel_residual=False, hidden_act="relu",
                               rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                "partial_rotary_factor": 0.5})
    donor = open_donor(path)
    assert (donor.spec.parallel_residual, donor.spec.mlp, donor.spec.rotary_pct) == (False, "relu", 0.5)
    ids = torch.randint(0, donor.spec.vocab_size, (1, 11))
    with torch.no_grad():
        assert_close(canonical_forward(donor.spec, donor.state_dict(), ids), hf(ids).logits, 1e-5, "neox relu")


def test_llama_biases_and_bf16_are_kept(tmp_path):
    hf, path = make_tiny_donor("llama", tmp_path / "llama", dtype=torch.bfloat16, attention_bias=True,
                               mlp_bias=True, tie_word_embeddings=False)
    donor = open_donor(path)
    s = donor.spec
    assert (s.qkv_bias, s.attn_out_bias, s.mlp_bias, s.tie_embeddings, s.dtype) == (True, True, True, False, "bfloat16")
    sd = hf.state_dict()
    for name, key in [("layers.1.mixer.o_proj.bias", "model.layers.1.self_attn.o_proj.bias"),
                      ("layers.0.mlp.gate_proj.bias", "model.layers.0.mlp.gate_proj.bias"),
                      ("lm_head.weight", "lm_head.weight")]:
        t = donor.get(name)
        assert t.dtype == torch.bfloat16 and torch.equal(t, sd[key])


def test_gguf_donor_is_unpermuted_to_hf_layout(tmp_path):
    hf, gguf_path = make_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    for where in (gguf_path, gguf_path.parent):  # the file, or a folder holding exactly one
        donor = open_donor(where)
        assert donor.format == "gguf" and donor.files == [gguf_path]
        want = DonorSpec(**expected_spec("llama", hf.config)).to_dict()
        got = donor.spec.to_dict()
        assert math.isclose(got.pop("norm_eps"), want.pop("norm_eps"), rel_tol=1e-6)  # stored as float32
        assert got == want
        exp = expected_tensors("llama", hf)
        assert donor.keys() == list(canonical_shapes(donor.spec)) and set(donor.keys()) == set(exp)
        for name in donor.keys():
            assert torch.equal(donor.get(name), exp[name][1]), name
        assert donor.source("layers.0.mixer.q_proj.weight").startswith("blk.0.attn_q.weight")


def test_bare_base_model_saves(tmp_path):
    """GPT2Model (the hub's gpt2 layout), LlamaModel and GPTNeoXModel saves have no prefix."""
    from transformers import AutoModel

    for family, over in (("gpt2", {}), ("llama", {}), ("gpt_neox", {"tie_word_embeddings": True})):
        full = build_tiny_model(family, **over)
        base = AutoModel.from_config(full.config)
        base.load_state_dict(full.base_model.state_dict())
        base.save_pretrained(tmp_path / family)
        donor = open_donor(tmp_path / family)
        assert donor.source("embed.weight") in ("wte.weight", "embed_tokens.weight", "embed_in.weight")
        want = expected_tensors(family, full)
        for name in donor.keys():
            assert torch.equal(donor.get(name), want[name][1]), (family, name)


def test_legacy_buffers_and_tied_head_are_recorded_drops(tmp_path):
    _, path = make_tiny_donor("gpt_neox", tmp_path / "neox")
    f = path / "model.safetensors"
    sd = load_file(f)
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    sd["gpt_neox.layers.1.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    sd["gpt_neox.layers.2.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(sd, f)
    donor = open_donor(path)
    assert set(donor.dropped) == {"gpt_neox.layers.0.attention.rotary_emb.inv_freq",
                                  "gpt_neox.layers.1.attention.bias", "gpt_neox.layers.2.attention.masked_bias"}
    assert all("deliberate drop" in why for why in donor.dropped.values())
    assert any(row[1] == "gpt_neox.layers.1.attention.bias" for row in donor.report())

    _, path = make_tiny_donor("gpt2", tmp_path / "gpt2")
    f = path / "model.safetensors"
    sd = load_file(f)
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    save_file(sd, f)
    donor = open_donor(path)
    assert "lm_head.weight" not in donor.keys()
    assert "duplicate of embed.weight" in donor.dropped["lm_head.weight"]
    assert "transformer.h.0.attn.bias" in donor.dropped


def test_tokenizer_dir_is_carried(tmp_path):
    _, path = make_tiny_donor("llama", tmp_path / "llama")
    assert open_donor(path).tokenizer_dir is None
    write_tiny_tokenizer(path, 203)
    assert open_donor(path).tokenizer_dir == path
    assert (path / "tokenizer.json").is_file()


def test_transformers4_style_configs(tmp_path):
    """config.json written by transformers 4.x: rotary_pct / rotary_emb_base / rope_theta, no rope_parameters."""
    hf, path = make_tiny_donor("gpt_neox", tmp_path / "neox")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["rope_parameters"], cfg["attention_bias"]
    cfg.update(rotary_pct=0.25, rotary_emb_base=10000, rope_scaling=None)
    (path / "config.json").write_text(json.dumps(cfg))
    assert open_donor(path).spec == DonorSpec(**expected_spec("gpt_neox", hf.config))

    hf, path = make_tiny_donor("llama", tmp_path / "llama")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=100000.0, rope_scaling=None)
    (path / "config.json").write_text(json.dumps(cfg))
    assert open_donor(path).spec == DonorSpec(**expected_spec("llama", hf.config))


# ------------------------------------------------------------------------------------------------
# errors: each names the file and the key


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_key_is_an_error_naming_it_and_the_file(tmp_path):
    _, path = make_tiny_donor("llama", tmp_path / "llama")
    f = path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.mystery_proj.weight"] = torch.zeros(4, 4)
    save_file(sd, f)
    with pytest.raises(DonorError, match=r"mystery_proj.*") as e:
        open_donor(path)
    assert str(f) in str(e.value) and "unknown tensor key" in str(e.value)


def test_layer_beyond_config_is_unknown(tmp_path):
    _, path = make_tiny_donor("qwen2", tmp_path / "qwen2")
    _edit_config(path, num_hidden_layers=1, layer_types=["full_attention"])
    with pytest.raises(DonorError, match=r"model\.layers\.1\..*config has 1 layers"):
        open_donor(path)


def test_truncated_safetensors_names_the_file(tmp_path):
    _, path = make_tiny_donor("gpt_neox", tmp_path / "neox")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DonorError, match="not a readable safetensors file") as e:
        open_donor(path)
    assert str(f) in str(e.value)
    f.write_bytes(b"\x00" * 5)
    with pytest.raises(DonorError, match="model.safetensors"):
        open_donor(path)


def test_corrupt_bin_names_the_file(tmp_path):
    _, path = make_tiny_donor("gpt2", tmp_path / "gpt2", fmt="bin")
    f = path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(DonorError, match="pytorch_model.bin"):
        open_donor(path)


def test_bin_with_code_is_refused_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('donor code ran')",))

    _, path = make_tiny_donor("gpt2", tmp_path / "gpt2", fmt="bin")
    torch.save({"transformer.wte.weight": Evil()}, path / "pytorch_model.bin")
    with pytest.raises(DonorError, match="weights-only"):
        open_donor(path)


def test_missing_config_and_missing_path(tmp_path):
    _, path = make_tiny_donor("llama", tmp_path / "llama")
    (path / "config.json").unlink()
    with pytest.raises(DonorError, match=r"config\.json.*missing"):
        open_donor(path)
    with pytest.raises(DonorError, match="does not exist"):
        open_donor(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DonorError, match="config.json"):
        open_donor(tmp_path / "empty")


def test_unknown_model_type_and_bad_json(tmp_path):
    _, path = make_tiny_donor("llama", tmp_path / "llama")
    _edit_config(path, model_type="bert")
    with pytest.raises(DonorError, match=r"config\.json.*unsupported model_type 'bert'"):
        open_donor(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(DonorError, match=r"config\.json.*not a readable JSON"):
        open_donor(path)


@pytest.mark.parametrize("family,changes,key", [
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "rope_parameters.rope_type"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                  "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                  "original_max_position_embeddings": 64}}, "rope_parameters.rope_type"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "mystery": 1.0,
                                   "original_max_position_embeddings": 64}}, "rope_parameters.mystery"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma", {"hidden_act": "relu"}, "hidden_act"),
    ("stablelm", {"qk_layernorm": True}, "qk_layernorm"),
    ("stablelm", {"use_parallel_residual": True}, "use_parallel_residual"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("gpt_neox", {"hidden_act": "quick_gelu"}, "hidden_act"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("llama", {"hidden_size": None}, "hidden_size"),
])
def test_unsupported_config_features_name_the_key(tmp_path, family, changes, key):
    _, path = make_tiny_donor(family, tmp_path / family)
    _edit_config(path, **changes)
    with pytest.raises(DonorError, match=rf"config\.json.*'{re.escape(key)}'"):
        open_donor(path)


def test_config_that_disagrees_with_the_tensors(tmp_path):
    _, path = make_tiny_donor("llama", tmp_path / "llama")
    _edit_config(path, vocab_size=256)  # tensors have 203 rows
    with pytest.raises(DonorError, match=r"model\.embed_tokens\.weight.*\(203, 64\).*\(256, 64\)"):
        open_donor(path)
    _edit_config(path, vocab_size=203, attention_bias=True)  # config promises biases the file lacks
    with pytest.raises(DonorError, match=r"lacks tensors.*q_proj\.bias"):
        open_donor(path)
    _edit_config(path, attention_bias=False, tie_word_embeddings=False)
    with pytest.raises(DonorError, match=r"lacks tensors.*lm_head\.weight"):
        open_donor(path)

    _, path = make_tiny_donor("mistral", tmp_path / "mistral")
    f = path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)  # Mistral has no biases
    save_file(sd, f)
    with pytest.raises(DonorError, match=r"q_proj\.bias.*does not have"):
        open_donor(path)


def test_sharded_index_problems_name_the_shard(tmp_path):
    _, path = make_tiny_donor("gpt_neox", tmp_path / "neox", fmt="sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(DonorError, match=rf"shard '{shard}'.*missing"):
        open_donor(path)

    _, path = make_tiny_donor("llama", tmp_path / "llama", fmt="sharded_bin")
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = "pytorch_model-00001-of-00003.bin"
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(DonorError, match=r"ghost\.weight.*not in that file"):
        open_donor(path)


def test_resolve_donor_paths(tmp_path):
    from megaxatl.assets.donors import resolve_donor

    _, path = make_tiny_donor("gpt2", tmp_path / "gpt2")
    assert resolve_donor(path) == path and resolve_donor(str(path)) == path
    with pytest.raises(DonorError, match="neither a known asset name"):
        resolve_donor(tmp_path / "missing")


def test_gguf_errors_name_the_file_and_key(tmp_path):
    _, path = make_tiny_gguf(tmp_path / "scaled.gguf", extra_metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(DonorError, match=r"scaled\.gguf.*'llama\.rope\.scaling\.type'"):
        open_donor(path)
    _, path = make_tiny_gguf(tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DonorError, match=r"cut\.gguf"):
        open_donor(path)
    (tmp_path / "second.gguf").write_bytes(b"")
    with pytest.raises(DonorError, match="several .gguf files"):
        open_donor(tmp_path)
