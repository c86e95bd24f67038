"""XATL transfer from tiny random HF donors of every family: parity, bit-exact copies, the report,
every copy mode, and mismatches that fail before anything is written."""

import json

import pytest
import torch

from fixtures_donors import FAMILIES, MAX_WINDOW, ROPE_SCALINGS, make_tiny_donor, make_tiny_gguf
from megaxatl.cli import main as cli_main
from megaxatl.config import config_from_dict
from megaxatl.donors import DonorError, open_donor
from megaxatl.transfer import TransferError, default_layer_map, from_donor, model_dict_from_donor


def cfg_for(donor_path, pattern, mode="emb+norm+mlp+oproj", layer_map=None, **model_over):
    spec = open_donor(donor_path).spec
    model = model_dict_from_donor(spec, pattern, pad_vocab_multiple=64, **model_over)
    return config_from_dict({"model": model, "transfer": {"mode": mode, "layer_map": layer_map}})


def max_logit_diff(model, hf, length: int = 3 * MAX_WINDOW + 2) -> float:
    """fp32 max abs logit difference on random sequences longer than every tiny donor's window."""
    ids = torch.randint(0, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model.eval()(ids), hf(ids).logits
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_only_transfer_reproduces_donor_logits(tmp_path, family):
    hf, path = make_tiny_donor(family, tmp_path / family)
    n = hf.config.num_hidden_layers
    cfg = cfg_for(path, "*" * n)
    model, report = from_donor(path, cfg)
    assert not [d for d in report.dropped if d["source"]]  # GPT-2's wpe too: learned positions are kept
    assert max_logit_diff(model, hf) < 1e-4
    t = report.totals()
    assert t["total"] == sum(p.numel() for p in model.parameters())
    # only the padded vocabulary rows are fresh
    pad = model.embed.weight.shape[0] - hf.config.vocab_size
    heads = 1 if cfg.model.tie_embeddings else 2
    assert t["fresh"] == pad * cfg.model.d_model * heads


def test_hybrid_copies_are_bit_exact_and_reported(tmp_path):
    hf, path = make_tiny_donor("gpt_neox", tmp_path / "neox")
    cfg = cfg_for(path, "M*M", mamba={"d_state": 8, "expand": 1.5})
    model, report = from_donor(path, cfg)
    donor = open_donor(path)
    p = dict(model.named_parameters())
    for j in range(3):
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "mlp.up_proj.weight", "mlp.down_proj.bias"):
            assert torch.equal(p[f"layers.{j}.{name}"], donor.get(f"layers.{j}.{name}"))
    assert torch.equal(p["layers.1.mixer.q_proj.weight"], donor.get("layers.1.mixer.q_proj.weight"))
    # W_O fills the first 64 of the 96 out_proj columns; the rest stays fresh
    assert torch.equal(p["layers.0.mixer.out_proj.weight"][:, :64], donor.get("layers.0.mixer.o_proj.weight"))
    assert p["layers.0.mixer.out_proj.weight"][:, 64:].abs().sum() > 0
    assert torch.equal(p["embed.weight"][:211], donor.get("embed.weight"))
    assert torch.equal(p["lm_head.weight"][:211], donor.get("lm_head.weight"))
    entries = {e["target"]: e for e in report.params}
    assert entries["layers.0.mixer.out_proj.weight"]["copied"] == 64 * 64
    assert entries["layers.0.mixer.out_proj.weight"]["note"].startswith("columns 0..63 of 96")
    assert entries["layers.0.mixer.in_proj.weight"]["status"] == "FRESH"
    assert entries["layers.0.mixer.A_log"]["init"].startswith("S4D-real")
    assert entries["layers.2.mlp.up_proj.weight"]["donor_key"] == ["gpt_neox.layers.2.mlp.dense_h_to_4h.weight"]
    # every donor tensor is copied or dropped with a reason
    used = {s for e in report.params for s in e["source"]}
    dropped = {d["source"]: d["reason"] for d in report.dropped if d["source"]}
    assert used | set(dropped) == set(donor.keys()) and not used & set(dropped)
    assert dropped["layers.0.mixer.q_proj.weight"] == "attention projection with no counterpart in the target's mixer"
    assert "layers.0.mixer.out_proj.weight" not in report.transferred  # partly fresh: it trains
    assert "layers.0.mlp.up_proj.weight" in report.transferred and "embed.weight" in report.transferred
    assert report.totals()["total"] == sum(x.numel() for x in model.parameters())
    assert "XATL transfer" in report.table() and "mlp" in report.table()


@pytest.mark.parametrize("mode,mlp_copied,oproj_copied", [("emb+norm+mlp+oproj", True, True),
                                                          ("emb+norm+mlp", True, False), ("emb+norm", False, False)])
def test_copy_modes(tmp_path, mode, mlp_copied, oproj_copied):
    _, path = make_tiny_donor("llama", tmp_path / "llama")
    cfg = cfg_for(path, "MMM", mode=mode, mamba={"d_state": 8, "expand": 1.0})
    model, report = from_donor(path, cfg)
    e = {x["target"]: x for x in report.params}
    assert (e["layers.1.mlp.gate_proj.weight"]["status"] == "COPIED") == mlp_copied
    assert (e["layers.1.mixer.out_proj.weight"]["status"] == "COPIED") == oproj_copied
    assert e["layers.1.norm2.weight"]["status"] == "COPIED"
    dropped = {d["source"]: d["reason"] for d in report.dropped}
    if not oproj_copied:
        assert dropped["layers.1.mixer.o_proj.weight"] == f"mode '{mode}' does not copy W_O"
    if not mlp_copied:
        assert dropped["layers.1.mlp.up_proj.weight"] == f"mode '{mode}' does not copy MLPs"


def test_attn_init_maps_v_k_q_with_gqa(tmp_path):
    _, path = make_tiny_donor("llama", tmp_path / "llama")  # 4 heads, 2 KV heads, head_dim 16
    cfg = cfg_for(path, "SMS", mode="attn-init",
                  mamba={"d_state": 8, "expand": 1.0},
                  mamba2={"d_state": 16, "head_dim": 16, "n_groups": 4, "expand": 1.0, "chunk_size": 8})
    model, report = from_donor(path, cfg)
    donor = open_donor(path)
    rep = lambda w: w.view(2, 16, 64).repeat_interleave(2, 0).reshape(64, 64)  # noqa: E731
    w = dict(model.named_parameters())["layers.0.mixer.in_proj.weight"]  # [z 64, x 64, B 64, C 64, dt 4]
    assert torch.equal(w[64:128], rep(donor.get("layers.0.mixer.v_proj.weight")))
    assert torch.equal(w[128:192], rep(donor.get("layers.0.mixer.k_proj.weight")))
    assert torch.equal(w[192:256], donor.get("layers.0.mixer.q_proj.weight"))
    w1 = dict(model.named_parameters())["layers.1.mixer.in_proj.weight"]  # Mamba-1 [x 64; z 64]
    assert torch.equal(w1[:64], rep(donor.get("layers.1.mixer.v_proj.weight")))
    e = {x["target"]: x for x in report.params}
    assert e["layers.0.mixer.in_proj.weight"]["copied"] == 3 * 64 * 64
    # the model still runs
    assert torch.isfinite(model(torch.randint(0, 203, (1, 9)))).all()


def test_default_layer_map_and_explicit_map(tmp_path):
    assert default_layer_map(4, 30) == [0, 10, 19, 29]
    assert default_layer_map(3, 3) == [0, 1, 2]
    assert default_layer_map(1, 7) == [0]
    with pytest.raises(TransferError, match="give transfer.layer_map"):
        default_layer_map(5, 3)
    hf, path = make_tiny_donor("gpt_neox", tmp_path / "neox")
    model, report = from_donor(path, cfg_for(path, "**", layer_map=[2, 0]))
    assert report.layer_map == [2, 0]
    assert torch.equal(model.layers[0].mlp.up_proj.weight, hf.gpt_neox.layers[2].mlp.dense_h_to_4h.weight)
    with pytest.raises(TransferError, match="names donor layer 7"):
        from_donor(path, cfg_for(path, "**", layer_map=[7, 0]))


@pytest.mark.parametrize("over,match", [
    (dict(d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, d_mlp=64), "d_model is 64 but the target config has model.d_model=32"),
    (dict(d_mlp=128), "MLP width is 256 but the target config has model.d_mlp=128"),
    (dict(n_heads=2, n_kv_heads=2, head_dim=32), "n_heads is 4 but the target config has model.n_heads=2"),
    (dict(norm="rmsnorm"), "norm is 'layernorm' but the target config has model.norm='rmsnorm'"),
    (dict(vocab_size=300), "vocab_size"),
    (dict(mamba={"expand": 0.5}), "out_proj.weight (64, 32) is narrower than the donor's layers.1.mixer.o_proj.weight"),
])
def test_mismatches_fail_naming_both_sides_and_write_nothing(tmp_path, over, match, capsys):
    _, path = make_tiny_donor("gpt_neox", tmp_path / "neox")
    spec = open_donor(path).spec
    model = model_dict_from_donor(spec, "*M*", **over)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"model": model}))
    out = tmp_path / "out"
    assert cli_main(["transfer", "--donor", str(path), "--config", str(cfg_path), "--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_writes_a_complete_output_and_refuses_to_overwrite(tmp_path, capsys):
    from megaxatl.checkpoint import load_model

    _, path = make_tiny_donor("qwen2", tmp_path / "qwen")
    spec = open_donor(path).spec
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"model": model_dict_from_donor(spec, "M*", mamba={"d_state": 8, "expand": 1.0})}))
    out = tmp_path / "out"
    assert cli_main(["transfer", "--donor", str(path), "--config", str(cfg_path), "--out", str(out),
                     "--format", "model-dir"]) == 0
    printed = capsys.readouterr().out
    assert "XATL transfer" in printed and "total" in printed
    model, cfg, meta = load_model(out)
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["total"] == sum(p.numel() for p in model.parameters())
    assert meta["transferred"] == report["transferred"]
    assert torch.equal(model.layers[1].mixer.k_proj.bias, open_donor(path).get("layers.1.mixer.k_proj.bias"))
    before = (out / "model.safetensors").read_bytes()
    assert cli_main(["transfer", "--donor", str(path), "--config", str(cfg_path), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert cli_main(["transfer", "--donor", str(path), "--config", str(cfg_path), "--out", str(out),
                     "--mode", "emb+norm", "--overwrite", "--format", "model-dir"]) == 0
    assert json.loads((out / "report.json").read_text())["mode"] == "emb+norm"


# ---- the donor features the newer families add ---------------------------------------------------

@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
def test_rope_scalings_reproduce_the_donor(tmp_path, name):
    """llama3 / linear / yarn RoPE, on sequences past their original context (16 / 32 positions)."""
    hf, path = make_tiny_donor("llama", tmp_path / name, rope_parameters=ROPE_SCALINGS[name])
    cfg = cfg_for(path, "***")
    assert cfg.model.rope_scaling.type == name
    model, _ = from_donor(path, cfg)
    assert max_logit_diff(model, hf, length=40) < 1e-4
    # a hybrid keeps the scaling for its attention layer, whose rotary tables are the all-attention ones
    hybrid, _ = from_donor(path, cfg_for(path, "M*M", mamba={"d_state": 8, "expand": 1.0}))
    assert hybrid.cfg.rope_scaling == cfg.model.rope_scaling
    a, b = hybrid.layers[1].mixer, model.layers[1].mixer
    assert torch.equal(a.q_proj.weight, b.q_proj.weight)
    assert torch.equal(a.rotary.inv_freq, b.rotary.inv_freq) and a.rotary.attention_factor == b.rotary.attention_factor
    assert torch.isfinite(hybrid(torch.randint(0, hf.config.vocab_size, (1, 40)))).all()


def test_legacy_rope_scaling_wins_over_rope_parameters(tmp_path):
    """transformers gives a 4.x `rope_scaling` priority over a default `rope_parameters`."""
    hf, path = make_tiny_donor("llama", tmp_path / "llama", rope_parameters=ROPE_SCALINGS["linear"])
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_scaling"] = cfg.pop("rope_parameters")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    assert open_donor(path).spec.rope_scaling == {"type": "linear", "factor": 2.0}
    model, _ = from_donor(path, cfg_for(path, "***"))
    assert max_logit_diff(model, hf) < 1e-4  # hf: built with the linear scaling itself


def test_mistral_windows_default_and_at_the_context_length(tmp_path):
    # no sliding_window key: transformers' 4096, on every layer
    _, path = make_tiny_donor("mistral", tmp_path / "nokey")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["sliding_window"]
    (path / "config.json").write_text(json.dumps(cfg))
    spec = open_donor(path).spec
    assert (spec.sliding_window, spec.sliding_layers) == (4096, (0, 1))
    # a window as long as the context is still a window: exact past it
    hf, path = make_tiny_donor("mistral", tmp_path / "atmax", sliding_window=16, max_position_embeddings=16)
    model, _ = from_donor(path, cfg_for(path, "**"))
    assert model.cfg.pattern == "WW" and model.cfg.local_attention.window == 16
    assert max_logit_diff(model, hf, length=30) < 1e-4


def test_training_past_max_seq_len_is_refused(tmp_path):
    from megaxatl.config import ConfigError

    _, path = make_tiny_donor("mistral", tmp_path / "m", sliding_window=16, max_position_embeddings=16)
    model = model_dict_from_donor(open_donor(path).spec, "**")
    with pytest.raises(ConfigError, match=r"data\.seq_len: 32 exceeds model\.max_seq_len 16"):
        config_from_dict({"model": model, "data": {"train_shards": "x", "seq_len": 32}})
    config_from_dict({"model": model, "data": {"train_shards": "x", "seq_len": 16}})


def test_llama3_gguf_rope_freqs_is_read_not_dropped(tmp_path):
    """llama.cpp stores llama3 scaling as a rope_freqs tensor, which transformers' GGUF loader
    skips: every tensor of the file is accounted for, this one becomes the RoPE scaling."""
    hf, path = make_tiny_gguf(tmp_path / "l3.gguf", rope_parameters=ROPE_SCALINGS["llama3"])
    donor = open_donor(path)
    assert donor.spec.rope_scaling["type"] == "factors" and "rope_freqs.weight" in donor.dropped
    model, report = from_donor(path, cfg_for(path, "***"))
    assert any(d["donor_key"] == "rope_freqs.weight" for d in report.dropped)
    assert max_logit_diff(model, hf, length=40) < 1e-4
    _, bad = make_tiny_gguf(tmp_path / "odd" / "x.gguf", extra_tensors={"blk.0.mystery.weight": torch.zeros(4)})
    with pytest.raises(DonorError, match=r"x\.gguf: GGUF tensor 'blk\.0\.mystery\.weight' has no counterpart"):
        open_donor(bad)


@pytest.mark.parametrize("family,pattern", [("gemma3_text", "MW*M"), ("olmo2", "*M"), ("phi3", "WM"),
                                            ("gemma2", "M*W"), ("qwen3", "*MW"), ("gemma", "M*"), ("stablelm", "*M")])
def test_hybrids_of_the_newer_families(tmp_path, family, pattern):
    """Kept attention layers get the donor layer's weights and q/k norms; every norm of every
    block is copied (post / sandwich placements); the model runs."""
    hf, path = make_tiny_donor(family, tmp_path / family)
    cfg = cfg_for(path, pattern, mamba={"d_state": 8, "expand": 2.0})
    model, report = from_donor(path, cfg)
    donor = open_donor(path)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if ".mixer." not in name or any(s in name for s in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm")):
            if name in donor:
                assert torch.equal(p[: donor.shape(name)[0]], donor.get(name)), name
    entries = {e["target"]: e for e in report.params}
    norms = [n for n in entries if "norm" in n.split(".")[-2] and "mixer" not in n]
    assert norms and all(entries[n]["status"] == "COPIED" for n in norms)
    assert torch.isfinite(model(torch.randint(0, hf.config.vocab_size, (1, 3 * MAX_WINDOW)))).all()


def test_a_window_layer_must_stay_a_window(tmp_path):
    _, path = make_tiny_donor("gemma2", tmp_path / "g2")  # layers: W * W
    spec = open_donor(path).spec
    model = model_dict_from_donor(spec, "***")
    assert model["pattern"] == "W*W"
    model["pattern"] = "W**"
    with pytest.raises(TransferError, match=r"target layer 2 is '\*' but donor layer 2 is sliding-window"):
        from_donor(path, config_from_dict({"model": model}))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sharded_output_is_the_in_memory_transfer_in_the_requested_dtype(tmp_path, dtype):
    """The default output: DCP shards at --tp x --pp, filled tensor by tensor (no target model is
    built), equal bit for bit to from_donor's model in that dtype, readable per rank."""
    from megaxatl.checkpoint.sharded import ShardedCheckpoint, read_shards_meta
    from megaxatl.transfer import from_donor

    _, path = make_tiny_donor("gpt_neox", tmp_path / "neox")
    spec = open_donor(path).spec
    cfg_path = tmp_path / "cfg.json"
    model_dict = model_dict_from_donor(spec, "*M*", mamba={"d_state": 8}, pad_vocab_multiple=8)
    cfg_path.write_text(json.dumps({"model": model_dict}))
    out = tmp_path / "out"
    assert cli_main(["transfer", "--donor", str(path), "--config", str(cfg_path), "--out", str(out),
                     "--dtype", dtype, "--tp", "2", "--pp", "2", "--quiet"]) == 0
    meta = read_shards_meta(out)
    assert meta["layout"] == {"tp": 2, "pp": 2} and sorted(meta["sha256"]) == sorted(
        [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"])
    assert (out / "report.json").is_file() and meta["transferred"]
    want_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ref, _ = from_donor(path, config_from_dict({"model": model_dict}), dtype=want_dtype)
    ckpt = ShardedCheckpoint(out)
    for name, p in ref.named_parameters():
        got = ckpt.read(name)
        assert got.dtype == want_dtype and torch.equal(got, p.detach()), name
