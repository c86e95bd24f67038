"""Tiny random donors of every supported family, built from a config on CPU (nothing downloaded).

Shared by the donor-reader tests and by transfer / parity tests elsewhere:

    from fixtures_donors import make_tiny_donor, make_tiny_gguf, FAMILIES  # tests/ is on sys.path
    hf_model, path = make_tiny_donor("gpt_neox", tmp_path / "neox")            # safetensors
    hf_model, path = make_tiny_donor("llama", tmp_path / "ll", fmt="sharded_bin")
    hf_model, gguf_path = make_tiny_gguf(tmp_path / "tiny.gguf")              # llama, F32 GGUF

Every builder keeps the model tiny (d_model 64, 2-3 layers, vocab 203-257, deliberately not a
multiple of 128 so vocab padding is exercised downstream), fills every parameter with random values
(biases and norm weights too, so a swapped or dropped tensor cannot hide behind an init of 0 or 1),
saves it (safetensors, sharded, .bin, sharded .bin, or GGUF) and returns the module in eval mode
with the path.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("gpt_neox", "llama", "qwen2", "mistral", "gpt2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
            "olmo2", "stablelm")
# the smallest sliding window of the tiny donors: parity sequences are longer than every window
MAX_WINDOW = 7


def tiny_config(family: str, **overrides):
    """The transformers config of the tiny donor of `family`; `overrides` are config kwargs."""
    from transformers import CONFIG_MAPPING, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    if family == "gpt_neox":
        # Pythia-like: parallel residual, rotary on 25% of head dims, untied, exact GELU, biases.
        kw = dict(vocab_size=211, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=256, hidden_act="gelu", max_position_embeddings=128,
                  use_parallel_residual=True, tie_word_embeddings=False, layer_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                  bos_token_id=0, eos_token_id=0)
        cls = GPTNeoXConfig
    elif family == "llama":
        # SmolLM2-like: GQA, SwiGLU, RMSNorm, tied embeddings.
        kw = dict(vocab_size=203, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=160, hidden_act="silu", max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                  bos_token_id=1, eos_token_id=2)
        cls = LlamaConfig
    elif family == "qwen2":
        # q/k/v biases, no o bias; untied; GQA.
        kw = dict(vocab_size=229, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  bos_token_id=3, eos_token_id=4)
        cls = Qwen2Config
    elif family == "mistral":
        # head_dim given explicitly and != d_model / n_heads; no sliding window.
        kw = dict(vocab_size=257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, intermediate_size=96, max_position_embeddings=128,
                  sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  bos_token_id=1, eos_token_id=2)
        cls = MistralConfig
    elif family == "gpt2":
        kw = dict(vocab_size=233, n_embd=64, n_layer=2, n_head=4, n_positions=96,
                  activation_function="gelu_new", tie_word_embeddings=True, layer_norm_epsilon=1e-5,
                  bos_token_id=5, eos_token_id=5)
        cls = GPT2Config
    elif family in NEWER:
        kw, cls = dict(NEWER[family]), CONFIG_MAPPING[family]
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


# the newer families, each with its distinguishing features switched on and small enough to matter
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
NEWER = {
    # per-head q/k RMSNorm; layers >= max_window_layers slide
    "qwen3": dict(vocab_size=219, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                  rope_parameters=dict(_ROPE, rope_theta=1e6), bos_token_id=1, eos_token_id=2),
    # (1 + w) norms, sqrt(d) embedding scale, GeGLU, MQA
    "gemma": dict(vocab_size=241, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=16, intermediate_size=128, max_position_embeddings=128, rope_parameters=_ROPE,
                  pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # sandwich norms, soft-capping (small caps, so they bite), alternating window, scale != hd**-0.5
    "gemma2": dict(vocab_size=251, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, intermediate_size=96, max_position_embeddings=128, sliding_window=5,
                   query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   rope_parameters=_ROPE, pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # q/k norm, local layers with their own base, linear RoPE scaling on the global ones only
    "gemma3_text": dict(vocab_size=263, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=128,
                        sliding_window=6, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1e6}},
                        pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # fused qkv_proj and gate_up_proj, partial rotary, a window on every layer
    "phi3": dict(vocab_size=227, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, max_position_embeddings=128, original_max_position_embeddings=128,
                 sliding_window=MAX_WINDOW, rope_parameters=dict(_ROPE, partial_rotary_factor=0.5),
                 tie_word_embeddings=False, pad_token_id=None, bos_token_id=1, eos_token_id=2),
    # post-sublayer norms, q/k norm over the whole projection
    "olmo2": dict(vocab_size=239, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, max_position_embeddings=128, rope_parameters=_ROPE, tie_word_embeddings=False,
                  pad_token_id=None, bos_token_id=1, eos_token_id=2),
    # LayerNorm, partial rotary, q/k/v biases
    "stablelm": dict(vocab_size=247, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, use_qkv_bias=True,
                     rope_parameters=dict(_ROPE, partial_rotary_factor=0.25), tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2),
}
# RoPE scalings on the tiny llama (head_dim 16): short original contexts, so every ramp is crossed
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
}


def build_tiny_model(family: str, seed: int = 0, **overrides):
    """A random tiny `*ForCausalLM` of `family` (eval mode, fp32), every parameter randomised."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norm weights around 1, everything else small and centred: a realistic, non-trivial model
            base = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


FORMATS = ("safetensors", "sharded", "bin", "sharded_bin")


def make_tiny_donor(family: str, path: Path | str, *, seed: int = 0, fmt: str = "safetensors",
                    dtype: torch.dtype | None = None, **overrides):
    """Build a tiny random donor of `family` and save it into the folder `path`.

    `fmt`: "safetensors" (`save_pretrained`), "sharded" (`save_pretrained` with a 20KB
    max_shard_size: many shards + `model.safetensors.index.json`), "bin" (`pytorch_model.bin`,
    a plain `torch.save` of the state dict, tied duplicates included as old checkpoints have them),
    "sharded_bin" (three `pytorch_model-0000k-of-00003.bin` + `pytorch_model.bin.index.json`).
    transformers 5 writes safetensors only, so the .bin layouts are written here by hand.
    `dtype` casts before saving (e.g. torch.bfloat16). `overrides` are config kwargs.
    Returns (hf_model, path): the module holds exactly the saved values.
    """
    import json

    path = Path(path)
    model = build_tiny_model(family, seed=seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; known: {FORMATS}")
    model.save_pretrained(path, max_shard_size="20KB" if fmt == "sharded" else "5GB")
    if fmt in ("safetensors", "sharded"):
        return model, path
    # the .bin files hold exactly what save_pretrained wrote (the on-disk key names, which can differ
    # from the module's: transformers 5 renames GPT-NeoX's embed_out <-> lm_head on load / save)
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
        return model, path
    keys = list(state)
    chunks = [keys[i::3] for i in range(3)]
    weight_map = {}
    for n, chunk in enumerate(chunks, 1):
        name = f"pytorch_model-{n:05d}-of-00003.bin"
        torch.save({k: state[k] for k in chunk}, path / name)
        weight_map.update({k: name for k in chunk})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return model, path


def write_tiny_tokenizer(path: Path | str, vocab_size: int) -> Path:
    """A minimal word-level `tokenizer.json` (+ config) for a tiny donor folder, made offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return path


def _llama_cpp_permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf Q/K permutation (HF rotate_half -> GGML interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(cfg) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf `rope_freqs` of a llama3-scaled config: one divisor per
    rotary pair (1 for high frequencies, `factor` for low ones, the smooth ramp between)."""
    import math

    rp = cfg.rope_parameters
    dim = cfg.head_dim
    freqs = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], \
        rp["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def make_tiny_gguf(path: Path | str, *, seed: int = 0, extra_metadata: dict | None = None,
                   extra_tensors: dict | None = None, **overrides):
    """A tiny random Llama donor written as an F32 GGUF file the way llama.cpp's converter writes
    one (Q/K rows permuted, GGUF tensor names, metadata; a llama3 RoPE scaling as the
    `rope_freqs.weight` tensor), plus the HF model it was made from.

    `extra_metadata`: more GGUF key/values (str or float), e.g. {"llama.rope.scaling.type": "yarn"}.
    `extra_tensors`: more GGUF tensors (name -> float32 tensor). Returns (hf_model, gguf_path).
    Needs the `gguf` package.
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model("llama", seed=seed, **overrides)
    cfg = model.config
    H, KV, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(L)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_float32(key, value)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(L):
        for hf, g in hf_to_gguf.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    for hf, g in names.items():
        w = sd[hf]
        if g.endswith("attn_q.weight"):
            w = _llama_cpp_permute(w, H)
        elif g.endswith("attn_k.weight"):
            w = _llama_cpp_permute(w, KV)
        writer.add_tensor(g, w.copy())
    extra = dict(extra_tensors or {})
    if cfg.rope_parameters.get("rope_type") == "llama3":
        extra["rope_freqs.weight"] = llama_cpp_rope_freqs(cfg)
    for name, t in extra.items():
        writer.add_tensor(name, t.numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path
