"""The real donor (SmolLM2-135M, fetched from its PyPI package and cached): transfer into a small
hybrid Mamba, and an attention-only reconstruction that generates what transformers generates."""

import pytest
import torch

from megaxatl.config import config_from_dict
from megaxatl.donors import open_donor
from megaxatl.models import generate
from megaxatl.transfer import from_donor, model_dict_from_donor

pytestmark = pytest.mark.registry  # fetches a real asset from a package registry (README: Testing)


@pytest.fixture(scope="module")
def smollm2():
    from megaxatl.assets.donors import fetch_smollm2

    return fetch_smollm2()


def test_real_donor_into_small_hybrid_mamba(smollm2):
    spec = open_donor(smollm2).spec
    model_cfg = model_dict_from_donor(spec, "M*MM", pad_vocab_multiple=128, mamba={"d_state": 16, "expand": 1.0})
    model, report = from_donor(smollm2, config_from_dict({"model": model_cfg}))
    assert report.layer_map == [0, 10, 19, 29]
    t = report.totals()
    assert t["total"] == sum(p.numel() for p in model.parameters())
    assert t["by_component"]["embedding"]["copied"] == 49152 * 576
    entries = {e["target"]: e for e in report.params}
    assert entries["layers.1.mixer.k_proj.weight"]["source"] == ["layers.10.mixer.k_proj.weight"]
    assert entries["layers.3.mixer.out_proj.weight"]["status"] == "COPIED"
    logits = model(torch.tensor([[1, 504, 3575, 282, 4649, 314]]))
    assert torch.isfinite(logits).all()


def test_attention_only_reconstruction_generates_like_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = open_donor(smollm2).spec
    cfg = config_from_dict({"model": model_dict_from_donor(spec, "*" * spec.n_layers)})
    ours, _ = from_donor(smollm2, cfg)
    tok = AutoTokenizer.from_pretrained(smollm2)
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    got = generate(ours, [ids[0].tolist()], max_new_tokens=8)[0]
    assert got == expected, (tok.decode(got), tok.decode(expected))
    assert "Paris" in tok.decode(got)
