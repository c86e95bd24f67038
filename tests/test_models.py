"""The model library against independent references: transformers' Mamba/Mamba-2 mixers, a naive
attention, and full-forward == step-by-step decoding for every mixer and a hybrid."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from megaxatl.config import config_from_dict
from megaxatl.models import build, count_parameters, generate
from megaxatl.models.attention import Attention
from megaxatl.models.mamba import Mamba
from megaxatl.models.mamba2 import Mamba2
from megaxatl.models.params import is_no_decay, keeps_fp32


def grads_of(module, loss):
    module.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def compare_modules(ours, ref, x, tol, what):
    """Same weights: forward output and every parameter / input gradient must agree."""
    ref.load_state_dict(ours.state_dict(), strict=True)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1)[0], ref(x2)
    y2 = y2[0] if isinstance(y2, tuple) else y2
    assert_close(y1, y2, tol, f"{what} forward")
    w = torch.randn_like(y1)
    g1, g2 = grads_of(ours, (y1 * w).sum()), grads_of(ref, (y2 * w).sum())
    for name in g1:
        assert_close(g1[name], g2[name], tol, f"{what} grad {name}")
    assert_close(x1.grad, x2.grad, tol, f"{what} grad input")


@pytest.mark.parametrize("seqlen", [1, 63])
def test_mamba_matches_transformers_mixer(seqlen):
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    ours = Mamba(32, d_state=8, d_conv=4, expand=2, dt_rank=4)
    with torch.no_grad():  # move A, D off their init so a wrong sign or index shows
        ours.A_log.add_(torch.randn_like(ours.A_log) * 0.3)
        ours.D.add_(torch.randn_like(ours.D) * 0.3)
    ref = MambaMixer(MambaConfig(hidden_size=32, state_size=8, expand=2, conv_kernel=4, time_step_rank=4,
                                 use_bias=False, use_conv_bias=True), layer_idx=0)
    ref.eval()
    compare_modules(ours, ref, torch.randn(2, seqlen, 32), 1e-5, f"mamba L={seqlen}")


@pytest.mark.parametrize("seqlen", [63, 100])
def test_mamba2_matches_transformers_mixer(seqlen):
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    ours = Mamba2(32, d_state=16, d_conv=4, expand=2, head_dim=16, n_groups=2, chunk_size=16)
    ref = Mamba2Mixer(Mamba2Config(hidden_size=32, state_size=16, expand=2, head_dim=16, num_heads=4, n_groups=2,
                                   conv_kernel=4, chunk_size=16, use_bias=False, use_conv_bias=True,
                                   layer_norm_epsilon=1e-5), layer_idx=0)
    ref.eval()
    compare_modules(ours, ref, torch.randn(2, seqlen, 32), 1e-5, f"mamba2 L={seqlen}")


def naive_attention(mod: Attention, x):
    """Explicit softmax attention with GQA by repetition and HF rotate_half rotary."""
    b, L, _ = x.shape
    H, KV, hd = mod.n_heads, mod.n_kv_heads, mod.head_dim
    q = mod.q_proj(x).view(b, L, H, hd).transpose(1, 2)
    k = mod.k_proj(x).view(b, L, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
    v = mod.v_proj(x).view(b, L, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
    r = mod.rotary.rot_dim
    inv = 1.0 / (mod_theta(mod) ** (torch.arange(0, r, 2).float() / r))
    ang = torch.arange(L).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rot(t):
        tr, tp = t[..., :r], t[..., r:]
        half = torch.cat([-tr[..., r // 2:], tr[..., : r // 2]], -1)
        return torch.cat([tr * cos + half * sin, tp], -1)

    q, k = rot(q), rot(k)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, L, H * hd)
    return mod.o_proj(y)


def mod_theta(mod):
    # recover theta from the first non-trivial inverse frequency: inv[1] = theta^(-2/r)
    r = mod.rotary.rot_dim
    return float(mod.rotary.inv_freq[1]) ** (-r / 2)


@pytest.mark.parametrize("kv,pct,bias", [(4, 1.0, False), (2, 0.25, True), (1, 0.5, False)])
def test_attention_matches_naive(kv, pct, bias):
    mod = Attention(64, 4, kv, 16, pct, 10000.0, qkv_bias=bias, out_bias=bias)
    x = torch.randn(2, 37, 64, requires_grad=True)
    y = mod(x)[0]
    ref = naive_attention(mod, x)
    assert_close(y, ref, 1e-5, "attention forward")
    gy = torch.autograd.grad(y.sum(), [x] + list(mod.parameters()))
    gr = torch.autograd.grad(ref.sum(), [x] + list(mod.parameters()))
    for a, b in zip(gy, gr):
        assert_close(a, b, 1e-5, "attention grad")


def tiny_cfg(pattern, **over):
    m = dict(vocab_size=97, d_model=32, n_layers=len(pattern), pattern=pattern, n_heads=4, n_kv_heads=2, d_mlp=64,
             rotary_pct=0.5, pad_vocab_multiple=16, mamba={"d_state": 8}, max_seq_len=128,
             mamba2={"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 8})
    m.update(over)
    return config_from_dict({"model": m})


PATTERNS = ["MM", "SS", "**", "M*S"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("variant", [dict(), dict(parallel_residual=True, mlp="gelu", norm="layernorm"),
                                     dict(mlp="swiglu", norm="rmsnorm", tie_embeddings=True), dict(mlp="none")])
def test_step_decode_equals_full_forward(pattern, variant):
    model = build(tiny_cfg(pattern, **variant)).eval()
    ids = torch.randint(0, 97, (2, 29))
    with torch.no_grad():
        full = model(ids)
        assert full.shape == (2, 29, 97)
        cache = model.empty_cache(2)
        steps = []
        for t in range(ids.shape[1]):
            logits, cache = model(ids[:, t: t + 1], cache)
            steps.append(logits)
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
        # chunked prefill (11 + 7 tokens) then steps gives the same
        cache = model.empty_cache(2)
        a, cache = model(ids[:, :11], cache)
        b, cache = model(ids[:, 11:18], cache)
        c, cache = model(ids[:, 18:19], cache)
        assert (torch.cat([a, b, c], 1) - full[:, :19]).abs().max() < 1e-4


# the donor-family options at once: sandwich (1+w) norms, q/k norm, soft-capping, a scale,
# sliding windows with their own RoPE, scaled RoPE, learned positions, embedding / logit scales
FAMILY_OPTIONS = dict(norm_placement="sandwich", norm_unit_offset=True, qk_norm="head", attn_softcap=4.0,
                      attn_scale=0.3, final_softcap=6.0, logit_scale=0.7, embed_scale=3.0, pos_embed=True,
                      mlp="geglu_tanh", norm="rmsnorm",
                      rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 16},
                      local_attention={"window": 5, "rope_theta": 500.0, "rope_scaling": {"type": "none"}})


@pytest.mark.parametrize("over", [dict(local_attention={"window": 5}), FAMILY_OPTIONS,
                                  dict(norm_placement="post", qk_norm="full", local_attention={"window": 3})])
def test_sliding_window_decodes_in_bounded_memory(over):
    """'W' layers: step decoding and chunked prefill equal the full forward past the window, and
    their KV cache never holds more than window - 1 positions (full attention keeps them all)."""
    model = build(tiny_cfg("W*MW", **over)).eval()
    window = model.cfg.local_attention.window
    ids = torch.randint(0, 97, (2, 29))
    with torch.no_grad():
        full = model(ids)
        cache = model.empty_cache(2)
        steps = []
        for t in range(ids.shape[1]):
            logits, cache = model(ids[:, t: t + 1], cache)
            steps.append(logits)
            assert cache[0].length == min(t + 1, window - 1) and cache[1].length == t + 1
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
        cache = model.empty_cache(2)
        a, cache = model(ids[:, :11], cache)
        b, cache = model(ids[:, 11:18], cache)
        assert cache[3].length == window - 1 and cache.pos == 18
        assert (torch.cat([a, b], 1) - full[:, :18]).abs().max() < 1e-4
        # the window matters: the same weights attending everywhere give other logits
        unwindowed = build(tiny_cfg("**M*", **over)).eval()
        unwindowed.load_state_dict(model.state_dict())
        assert (unwindowed(ids) - full).abs().max() > 1e-3


def test_learned_positions_end_at_max_seq_len():
    model = build(tiny_cfg("*", pos_embed=True, max_seq_len=8)).eval()
    assert model.pos_embed.weight.shape == (8, 32)
    with pytest.raises(ValueError, match="position 8 is past the learned position embedding's model.max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_generate_greedy_matches_recomputed_argmax_and_batches_unequal_prompts():
    model = build(tiny_cfg("M*S")).eval()
    prompts = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10]]
    batched = generate(model, prompts, max_new_tokens=6)
    for p, out in zip(prompts, batched):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out == seq[len(p):]
        assert generate(model, [p], max_new_tokens=6)[0] == out


def test_sampling_options_and_eos():
    from megaxatl.models import sample_next

    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)} == {1, 2}
    # top_p small enough keeps only the most likely token
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(50)} == {1}
    model = build(tiny_cfg("MM")).eval()
    first = generate(model, [[1, 2, 3]], max_new_tokens=5)[0]
    stopped = generate(model, [[1, 2, 3]], max_new_tokens=5, eos_token_id=first[1])[0]
    assert stopped == first[:2]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=2)


def test_parameter_count_and_markers():
    cfg = tiny_cfg("M*S", tie_embeddings=True)
    model = build(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert model.embed.weight.shape[0] == 112  # 97 padded to a multiple of 16
    named = dict(model.named_parameters())
    assert keeps_fp32(named["layers.0.mixer.A_log"]) and keeps_fp32(named["layers.2.mixer.D"])
    assert is_no_decay(named["layers.1.norm1.weight"]) and not is_no_decay(named["layers.1.mlp.up_proj.weight"])
    assert "lm_head.weight" not in named  # tied


def test_padded_rows_are_never_predicted():
    model = build(tiny_cfg("MM"))
    ids = torch.randint(0, 97, (1, 9))
    logits = model(ids)
    assert logits.shape[-1] == 97
    loss = model.loss(ids, ids)
    assert torch.isfinite(loss) and abs(loss.item() - F.cross_entropy(logits[0], ids[0]).item()) < 1e-5


def test_gradient_checkpointing_gives_same_gradients():
    cfg = tiny_cfg("M*S")
    a, b = build(cfg), build(cfg)
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing = True
    ids = torch.randint(0, 97, (2, 20))
    a.loss(ids, ids).backward()
    b.loss(ids, ids).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert_close(q.grad, p.grad, 1e-6, n)
