"""Retention (RetNet): the decay schedule, the three forms against each other and against RetNet's
parallel formula written out, decoding with `R` in a pattern, and XATL transfer into "R*R"."""

import pytest
import torch

from fixtures_donors import make_tiny_donor
from helpers import assert_close
from megaxatl.config import config_from_dict
from megaxatl.donors import open_donor
from megaxatl.models.retention import Retention, retention_log_decay
from megaxatl.transfer import from_donor, model_dict_from_donor
from test_gla import assert_forms_agree, decode_matches_forward, tiny_lm

TOL = 1e-5


def test_decay_schedule_is_torchscale():
    gamma = retention_log_decay(4).exp()
    assert torch.allclose(gamma, 1 - 2.0 ** (-5 - torch.arange(4.0)), rtol=0, atol=1e-7)
    spread = retention_log_decay(8, base=5, span=7).exp()
    assert torch.allclose(spread, 1 - 2.0 ** (-5 - torch.arange(8.0)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("L,chunk,kv", [(63, 10, 4), (100, 64, 2), (17, 32, 4)])
def test_retention_forms_agree(L, chunk, kv):
    mixer = Retention(32, 4, kv, 8, rotary_pct=0.5, rope_theta=10000.0, qkv_bias=True, chunk_size=chunk,
                      decay_base=1.0)  # fast decays, so the decay is visible within the sequence
    assert_forms_agree(mixer, torch.randn(2, L, 32))


def test_parallel_form_is_retnets_formula():
    """Retention(X) = (Q K^T / sqrt(hd) . D) V with D[n, m] = gamma^(n - m) (n >= m), then GroupNorm
    per head, swish gate and W_O; Q, K rotated (rotate_half) at their positions."""
    torch.manual_seed(1)
    H, hd, L = 2, 8, 11
    m = Retention(16, H, H, hd, rotary_pct=1.0, rope_theta=10000.0, form="parallel")
    x = torch.randn(1, L, 16)
    q = m.q_proj(x).view(1, L, H, hd).transpose(1, 2)
    k = m.k_proj(x).view(1, L, H, hd).transpose(1, 2)
    v = m.v_proj(x).view(1, L, H, hd).transpose(1, 2)
    cos, sin = m.rotary.cos_sin(torch.arange(L))
    q, k = m.rotary(q, cos, sin), m.rotary(k, cos, sin)
    n = torch.arange(L)
    gamma = (1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))).view(H, 1, 1)
    D = torch.where(n[:, None] >= n[None, :], gamma ** (n[:, None] - n[None, :]), 0).float()
    o = ((q @ k.transpose(-1, -2)) * hd ** -0.5 * D) @ v  # (1, H, L, hd)
    o = torch.nn.functional.layer_norm(o, (hd,), eps=1e-5).transpose(1, 2)
    y = m.o_proj((torch.nn.functional.silu(m.g_proj(x)).view(1, L, H, hd) * o).reshape(1, L, H * hd))
    with torch.no_grad():
        assert_close(m(x)[0], y, TOL, "RetNet formula")


@pytest.mark.parametrize("heads", [None, 2])
def test_retention_lm_step_decode_equals_forward(heads):
    """heads=2: retention splits the attention width (4 x 8) into 2 heads of 16, as RetNet-410m."""
    model = tiny_lm("R*R", retention={"chunk_size": 4, "decay_base": 1.0, "n_heads": heads})
    assert model.layers[0].mixer.n_heads == (heads or 4) and model.layers[1].mixer.n_heads == 4
    decode_matches_forward(model)


def test_retention_heads_must_divide_the_width():
    from megaxatl.config.load import ConfigError

    with pytest.raises(ConfigError, match="retention.n_heads"):
        tiny_lm("R*R", retention={"n_heads": 3})


@pytest.mark.parametrize("mode", ["emb+norm+mlp+oproj", "attn-init", "emb+norm"])
def test_transfer_into_retention_hybrid(tmp_path, mode):
    hf, path = make_tiny_donor("gpt_neox", tmp_path / "neox")
    donor = open_donor(path)
    model_dict = model_dict_from_donor(donor.spec, "R*R", pad_vocab_multiple=64)
    cfg = config_from_dict({"model": model_dict, "transfer": {"mode": mode}})
    model, report = from_donor(path, cfg)
    p = dict(model.named_parameters())
    for j in range(3):
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            assert torch.equal(p[f"layers.{j}.{name}"], donor.get(f"layers.{j}.{name}"))
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):  # the attention layer, always whole
        assert torch.equal(p[f"layers.1.mixer.{n}.weight"], donor.get(f"layers.1.mixer.{n}.weight"))
    entries = {e["target"]: e for e in report.params}
    for i in (0, 2):
        oproj = torch.equal(p[f"layers.{i}.mixer.o_proj.weight"], donor.get(f"layers.{i}.mixer.o_proj.weight"))
        assert oproj == (mode != "emb+norm")
        for n in ("q_proj", "k_proj", "v_proj"):
            for t in ("weight", "bias"):
                key = f"layers.{i}.mixer.{n}.{t}"
                same = torch.equal(p[key], donor.get(key))
                assert same == (mode == "attn-init"), key
                assert entries[key]["status"] == ("COPIED" if mode == "attn-init" else "FRESH")
        assert entries[f"layers.{i}.mixer.g_proj.weight"]["status"] == "FRESH"
    t = report.totals()
    assert t["total"] == sum(x.numel() for x in model.parameters())
    used = {s for e in report.params for s in e["source"]}
    dropped = {d["source"]: d["reason"] for d in report.dropped if d["source"]}
    assert used | set(dropped) == set(donor.keys()) and not used & set(dropped)
    if mode == "emb+norm+mlp+oproj":
        assert dropped["layers.0.mixer.q_proj.weight"].startswith("mode 'emb+norm+mlp+oproj' does not copy Q/K/V")
    if mode == "attn-init":  # the whole retention layer but g_proj is the donor's: it runs finite
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 211, (1, 9)))).all()
