"""`megaxatl export-hf` / `import-hf`: every export path loads with AutoModelForCausalLM, gives our
logits (fp32, max abs diff < 1e-4), and imports back to bit-identical weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures_models import VOCAB, tiny_model_config

from megaxatl.checkpoint import load_model, load_model_dir, save_model_dir
from megaxatl.cli import main
from megaxatl.config import config_from_dict, config_to_dict
from megaxatl.export import ExportError, export_hf, import_hf
from megaxatl.export.hf import PAD_FILE, SIDECAR
from megaxatl.models import build

TOL = 1e-4

# name -> (pattern, model-section overrides, expected HF class). Vocabulary padded to 448 rows
# (pad_vocab_multiple 64) everywhere, so the padding rows' round trip is always exercised.
CASES = {
    "llama": ("**", dict(n_kv_heads=2, rope_theta=500.0), "LlamaForCausalLM"),
    "qwen2": ("**", dict(qkv_bias=True, mlp_bias=False, tie_embeddings=False, norm_eps=1e-6), "Qwen2ForCausalLM"),
    "gpt_neox": ("***", dict(norm="layernorm", mlp="gelu", mlp_bias=True, parallel_residual=True, rotary_pct=0.25,
                             qkv_bias=True, attn_out_bias=True, tie_embeddings=False), "GPTNeoXForCausalLM"),
    "gpt_neox_seq": ("**", dict(norm="layernorm", mlp="gelu_tanh", mlp_bias=True, rotary_pct=0.5),
                     "GPTNeoXForCausalLM"),
    "mamba": ("MM", dict(mlp="none", tie_embeddings=False, mamba={"d_state": 8, "expand": 2.0, "dt_rank": 3}),
              "MambaForCausalLM"),
    "mamba2": ("SS", dict(mlp="none", mamba2={"d_state": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8}),
               "Mamba2ForCausalLM"),
    "bamba": ("S*S", dict(n_kv_heads=2, rotary_pct=0.5, qkv_bias=True, attn_out_bias=True, tie_embeddings=False,
                          mamba2={"d_state": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8}), "BambaForCausalLM"),
    "remote_mamba_hybrid": ("M*M", dict(mamba={"d_state": 8, "expand": 1.5}), "MegaxatlForCausalLM"),
    "remote_retention": ("R*R", dict(n_kv_heads=2, rotary_pct=0.5, retention={"decay_span": 6.0}),
                         "MegaxatlForCausalLM"),
    "remote_gla": ("G*G", dict(n_kv_heads=2, tie_embeddings=False, gla={"gate_low_rank_dim": 8}),
                   "MegaxatlForCausalLM"),
    "remote_every_mixer": ("M*SRG", dict(norm="layernorm", mlp="relu", parallel_residual=True, rotary_pct=0.5,
                                         qkv_bias=True, retention={"n_heads": 2, "gate": False},
                                         mamba2={"d_state": 8, "head_dim": 16, "n_groups": 1}),
                           "MegaxatlForCausalLM"),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from test_data_common import make_hf_tokenizer

    return make_hf_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", VOCAB)


def make_model(path: Path, pattern: str, tokenizer_dir: Path | None, seed: int = 0, **over) -> Path:
    """A tiny model folder whose every tensor is random (norm weights around 1, biases non-zero,
    SSM parameters perturbed), so that a swapped or dropped tensor shows in the logits."""
    cfg = config_from_dict(tiny_model_config(pattern, pad_vocab_multiple=64, **over))
    torch.manual_seed(seed)
    model = build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.embed.weight.normal_(0, 0.5)
    save_model_dir(path, model.state_dict(), {"config": config_to_dict(cfg), "step": 7, "transferred": ["x"]},
                   tokenizer_dir=tokenizer_dir)
    return path


def our_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _, _ = load_model(model_dir)
    with torch.no_grad():
        return model.float().eval()(ids)


def hf_logits(hf_dir: Path, ids: torch.Tensor, remote: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=remote, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits, model


def assert_same_folder(a: Path, b: Path) -> None:
    sa, ma = load_model_dir(a)
    sb, mb = load_model_dir(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    strip = lambda m: {k: v for k, v in m.items() if k != "sha256"}  # noqa: E731
    assert strip(ma) == strip(mb)
    ta, tb = a / "tokenizer", b / "tokenizer"
    assert ta.is_dir() == tb.is_dir()
    if ta.is_dir():
        assert sorted(p.name for p in ta.iterdir()) == sorted(p.name for p in tb.iterdir())
        for p in ta.iterdir():
            assert p.read_bytes() == (tb / p.name).read_bytes(), p.name


@pytest.mark.parametrize("case", list(CASES))
def test_export_logits_and_round_trip(case, tmp_path, tokenizer_dir):
    pattern, over, hf_class = CASES[case]
    src = make_model(tmp_path / "model", pattern, tokenizer_dir, **over)
    out = tmp_path / "hf"
    arch = export_hf(src, out)
    assert arch.hf_class == hf_class
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf_class]
    assert (out / "tokenizer.json").is_file() and (out / PAD_FILE).is_file() and (out / SIDECAR).is_file()
    assert config["eos_token_id"] == 0 and config["bos_token_id"] is None  # the tokenizer's, not class defaults
    if arch.remote:
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        assert "import megaxatl" not in (out / "modeling_megaxatl.py").read_text()  # self-contained

    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    ours = our_logits(src, ids)
    theirs, hf_model = hf_logits(out, ids, arch.remote)
    assert theirs.shape == ours.shape == (2, 13, VOCAB)
    diff = (theirs - ours).abs().max().item()
    assert diff < TOL, f"{case}: max abs logit diff {diff:.2e}"
    assert hf_model.config.tie_word_embeddings == over.get("tie_embeddings", True)

    back = tmp_path / "back"
    assert import_hf(out, back) == hf_class
    assert_same_folder(src, back)


def test_remote_generate_carries_state_and_matches_greedy_decoding(tmp_path, tokenizer_dir):
    """Every mixer kind: generate() with the carried state gives our greedy decode and the same
    tokens as re-reading the whole sequence each step; after the prompt each step reads one
    token; beam search (rows reordered between steps) still matches the stateless run."""
    from megaxatl.models.generation import generate

    src = make_model(tmp_path / "model", "M*SRG", tokenizer_dir, mamba2={"d_state": 8, "head_dim": 16},
                     retention={"n_heads": 2})
    out = tmp_path / "hf"
    export_hf(src, out)
    ids = torch.tensor([[5, 17, 99, 3], [8, 2, 41, 77]])
    _, hf_model = hf_logits(out, ids, remote=True)
    lengths = []
    hook = hf_model.model.register_forward_hook(lambda m, args, kw, out: lengths.append(kw["input_ids"].shape[1]),
                                                with_kwargs=True)
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        theirs = hf_model.generate(ids, **kw)
        hook.remove()
        stateless = hf_model.generate(ids, use_cache=False, **kw)
        beams = [hf_model.generate(ids, num_beams=3, use_cache=c, **kw) for c in (True, False)]
    assert lengths == [4, 1, 1, 1, 1, 1]
    assert torch.equal(theirs, stateless)
    assert torch.equal(beams[0], beams[1])
    model, _, _ = load_model(src)
    ours = generate(model.float(), ids.tolist(), 6)
    assert theirs[:, 4:].tolist() == ours
    # logits: a prompt of 3, then 2 tokens, then 1 at a time through the state == one full pass
    seq = theirs[:, :9]
    state_cls = type(hf_model).forward.__globals__["MegaxatlState"]
    state = state_cls(len(hf_model.model.layers))
    with torch.no_grad():
        full = hf_model(seq).logits
        parts = [hf_model(seq[:, a:b], megaxatl_state=state).logits for a, b in ((0, 3), (3, 5), (5, 6), (6, 9))]
    assert state.seen == 9 and torch.equal(state.tokens, seq)
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


def test_remote_padding_gives_each_row_its_unpadded_result(tmp_path, tokenizer_dir):
    """Left padding (batched generate, with and without the carried state) and right padding
    (scoring) leave every row's logits and tokens as if it ran alone; a gap is refused."""
    src = make_model(tmp_path / "model", "M*SRG", tokenizer_dir, mamba2={"d_state": 8, "head_dim": 16},
                     retention={"n_heads": 2})
    out = tmp_path / "hf"
    export_hf(src, out)
    rows = [[5, 17, 99, 3, 42], [8, 2, 41]]
    _, hf_model = hf_logits(out, torch.tensor([rows[0]]), remote=True)
    width = max(map(len, rows))
    left = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    left_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    right = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    right_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    kw = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        alone_logits = [hf_model(torch.tensor([r])).logits[0] for r in rows]
        alone = [hf_model.generate(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)
                 for r in rows]
        left_logits = hf_model(left, attention_mask=left_mask).logits
        right_logits = hf_model(right, attention_mask=right_mask).logits
        batched = [hf_model.generate(left, attention_mask=left_mask, use_cache=c, **kw) for c in (True, False)]
        with pytest.raises(ValueError, match="padding between real tokens"):
            hf_model(right, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 0, 0]]))
    for b, r in enumerate(rows):
        pad = width - len(r)
        assert (left_logits[b, pad:] - alone_logits[b]).abs().max().item() < 1e-5
        assert (right_logits[b, :len(r)] - alone_logits[b]).abs().max().item() < 1e-5
        for gen in batched:
            assert gen[b, width:].tolist() == alone[b][0, len(r):].tolist()


def test_forced_stock_arch_must_fit_and_remote_works_for_attention(tmp_path, tokenizer_dir):
    src = make_model(tmp_path / "model", "**", tokenizer_dir, n_kv_heads=2)
    with pytest.raises(ExportError, match=r"GPTNeoXForCausalLM does not reproduce this model exactly: norm .rmsnorm. \(as GPTNeoXForCausalLM: .layernorm.\)"):
        export_hf(src, tmp_path / "neox", arch="gpt_neox")
    assert not (tmp_path / "neox").exists()
    out = tmp_path / "remote"
    assert export_hf(src, out, arch="remote").remote
    ids = torch.randint(0, VOCAB, (1, 9))
    theirs, _ = hf_logits(out, ids, remote=True)
    assert (theirs - our_logits(src, ids)).abs().max().item() < TOL
    import_hf(out, tmp_path / "back")
    assert_same_folder(src, tmp_path / "back")


def test_bf16_weights_and_sharded_folder_round_trip(tmp_path, tokenizer_dir):
    """Nothing is cast on the way out or back; a re-sharded export still imports."""
    from safetensors.torch import load_file, save_file

    src32 = make_model(tmp_path / "m32", "S*", tokenizer_dir, mamba2={"d_state": 8, "head_dim": 16})
    state, meta = load_model_dir(src32)
    src = save_model_dir(tmp_path / "m16", {k: v.bfloat16() for k, v in state.items()},
                         {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")},
                         tokenizer_dir=tokenizer_dir)
    out = tmp_path / "hf"
    export_hf(src, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(out / "model.safetensors")
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, out / name)
    (out / "model.safetensors").unlink()
    weight_map = {k: name for name, part in shards.items() for k in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    import_hf(out, tmp_path / "back")
    assert_same_folder(src, tmp_path / "back")


def test_output_may_not_replace_the_input(tmp_path, tokenizer_dir):
    src = make_model(tmp_path / "model", "**", tokenizer_dir)
    with pytest.raises(ExportError, match="must not be the input"):
        export_hf(src, src, overwrite=True)
    with pytest.raises(ExportError, match="must not be the input"):
        export_hf(src, src / "hf")
    load_model_dir(src)  # untouched


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_import_stock_folder_not_written_by_us(family, tmp_path):
    from fixtures_donors import make_tiny_donor, write_tiny_tokenizer

    hf_model, path = make_tiny_donor(family, tmp_path / "donor")
    write_tiny_tokenizer(path, hf_model.config.vocab_size)
    assert main(["import-hf", "--hf", str(path), "--out", str(tmp_path / "m")]) == 0
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = hf_model(ids).logits
    assert (our_logits(tmp_path / "m", ids) - expected).abs().max().item() < TOL
    assert (tmp_path / "m" / "tokenizer" / "tokenizer.json").is_file()
    assert not (tmp_path / "m" / "tokenizer" / "model.safetensors").exists()


def test_cli_round_trip_and_errors(tmp_path, tokenizer_dir, capsys):
    src = make_model(tmp_path / "model", "*S", tokenizer_dir, mamba2={"d_state": 8, "head_dim": 16})
    out = tmp_path / "hf"
    assert main(["export-hf", "--model", str(src), "--out", str(out)]) == 0
    assert "BambaForCausalLM" in capsys.readouterr().out

    # an existing output is refused without --overwrite, and left as it was
    before = sorted(p.name for p in out.iterdir())
    assert main(["export-hf", "--model", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before
    assert main(["export-hf", "--model", str(src), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()

    assert main(["import-hf", "--hf", str(out), "--out", str(tmp_path / "back")]) == 0
    assert_same_folder(src, tmp_path / "back")
    assert main(["import-hf", "--hf", str(out), "--out", str(tmp_path / "back")]) == 2
    assert "already exists" in capsys.readouterr().err

    # a missing model folder: one line naming it, nothing written
    missing = tmp_path / "nope"
    assert main(["export-hf", "--model", str(missing), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert not (tmp_path / "hf2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf2")]

    # a forced class that does not fit: one line with the reason
    assert main(["export-hf", "--model", str(src), "--out", str(tmp_path / "hf3"), "--arch", "mamba2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Mamba2ForCausalLM" in err and "blocks have an MLP" in err

    # a tampered export: the unknown tensor is named
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, bad / "model.safetensors")
    assert main(["import-hf", "--hf", str(bad), "--out", str(tmp_path / "back2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.layers.0.mystery.weight" in err and not (tmp_path / "back2").exists()

    # not an HF folder at all
    assert main(["import-hf", "--hf", str(src), "--out", str(tmp_path / "back3")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_arch_choices_match_the_table():
    from megaxatl.export.cli import ARCH_CHOICES
    from megaxatl.export.hf import ARCH_NAMES

    assert ARCH_CHOICES == ("auto",) + ARCH_NAMES


# ---- the donor families: an all-attention transfer exports to the family's own class ------------

def transferred(tmp_path: Path, family: str, pattern: str | None = None, **over):
    """(donor HF module, model folder of its all-attention transfer, or of `pattern`)."""
    from fixtures_donors import make_tiny_donor

    from megaxatl.donors import open_donor
    from megaxatl.transfer import from_donor, model_dict_from_donor, write_transfer

    hf, path = make_tiny_donor(family, tmp_path / "donor", **over)
    spec = open_donor(path).spec
    cfg = config_from_dict({"model": model_dict_from_donor(spec, pattern or "*" * spec.n_layers, pad_vocab_multiple=64,
                                                           mamba={"d_state": 8, "expand": 2.0})})
    model, report = from_donor(path, cfg)
    return hf, write_transfer(tmp_path / "model", model, cfg, report)


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "stablelm",
                                    "gpt2"])
def test_donor_family_exports_to_its_stock_class_and_back(family, tmp_path):
    from fixtures_donors import MAX_WINDOW

    over = {"sliding_window": 5} if family == "mistral" else {}
    hf, src = transferred(tmp_path, family, **over)
    arch = export_hf(src, tmp_path / "hf")
    assert arch.hf_class == type(hf).__name__ and not arch.remote
    ids = torch.randint(0, hf.config.vocab_size, (2, 3 * MAX_WINDOW + 2), generator=torch.Generator().manual_seed(1))
    theirs, _ = hf_logits(tmp_path / "hf", ids, remote=False)
    with torch.no_grad():
        donor = hf(ids).logits
    assert (theirs - donor).abs().max().item() < TOL
    assert (our_logits(src, ids) - donor).abs().max().item() < TOL
    assert import_hf(tmp_path / "hf", tmp_path / "back") == arch.hf_class
    assert_same_folder(src, tmp_path / "back")


@pytest.mark.parametrize("name", ["llama3", "yarn"])
def test_rope_scaled_llama_exports_as_llama(name, tmp_path):
    from fixtures_donors import ROPE_SCALINGS

    hf, src = transferred(tmp_path, "llama", rope_parameters=ROPE_SCALINGS[name])
    assert export_hf(src, tmp_path / "hf").hf_class == "LlamaForCausalLM"
    ids = torch.randint(0, hf.config.vocab_size, (1, 40))
    theirs, _ = hf_logits(tmp_path / "hf", ids, remote=False)
    with torch.no_grad():
        assert (theirs - hf(ids).logits).abs().max().item() < TOL
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert_same_folder(src, tmp_path / "back")


def test_what_no_stock_class_has_goes_to_remote_code_exactly(tmp_path, tokenizer_dir):
    """Every donor-family option at once (test_models.FAMILY_OPTIONS) in a hybrid with a window
    layer: the stock classes name what they lack, the shipped code gives our logits, decodes with
    a window-bounded cache and greedy-generates our tokens; import gives the same bits."""
    from test_models import FAMILY_OPTIONS

    from megaxatl.export.hf import fit_table, model_facts
    from megaxatl.models.generation import generate

    src = make_model(tmp_path / "model", "W*MW", tokenizer_dir, n_kv_heads=2, mlp_bias=False,
                     mamba={"d_state": 8, "expand": 2.0}, **FAMILY_OPTIONS)
    cfg = load_model(src)[1].model
    table = dict(fit_table(cfg, model_facts(cfg)))
    assert "pattern has 'M' layers" in table["Gemma3ForCausalLM"]
    assert export_hf(src, tmp_path / "hf").remote
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(2))
    theirs, hf_model = hf_logits(tmp_path / "hf", ids, remote=True)
    assert (theirs - our_logits(src, ids)).abs().max().item() < TOL
    state_cls = type(hf_model).forward.__globals__["MegaxatlState"]
    state = state_cls(len(hf_model.model.layers))
    with torch.no_grad():
        parts = [hf_model(ids[:, a:b], megaxatl_state=state).logits for a, b in ((0, 9), (9, 10), (10, 23))]
    assert (torch.cat(parts, 1) - theirs).abs().max().item() < 1e-5
    assert state.layers[0]["k"].shape[2] == FAMILY_OPTIONS["local_attention"]["window"] - 1
    assert state.layers[1]["k"].shape[2] == 23
    with torch.no_grad():
        gen = hf_model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, attention_mask=torch.ones(2, 6))
    model, _, _ = load_model(src)
    assert gen[:, 6:].tolist() == generate(model.float(), ids[:, :6].tolist(), 6)
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert_same_folder(src, tmp_path / "back")
