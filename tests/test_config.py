"""Config loading: the shipped configs load, and each kind of bad input names file, key and reason."""

import json
from pathlib import Path

import pytest

from megaxatl.config import ConfigError, config_to_dict, load_config
from megaxatl.info import shipped_configs
from megaxatl.models import count_parameters

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, data, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def base_model(**over):
    m = dict(vocab_size=100, d_model=64, n_layers=2, pattern="M*", n_heads=4, d_mlp=128)
    m.update(over)
    return {"model": m}


def test_every_shipped_config_loads():
    paths = shipped_configs()
    assert len(paths) >= 12
    for p in paths:
        cfg = load_config(p)
        assert cfg.model.n_layers == len(cfg.model.layer_symbols)


@pytest.mark.parametrize("name,billions", [("mamba_160m", 0.16), ("mamba_410m", 0.41), ("mamba_1.4b", 1.4), ("mamba_2.8b", 2.8)])
def test_real_sizes_match_their_names(name, billions):
    n = count_parameters(load_config(CONFIGS / f"{name}.json"))
    # the Pythia names round: pythia-160m has 162M, -410m 405M, -1.4b 1.41B, -2.8b 2.78B
    tol = 0.05 if name == "mamba_2.8b" else 0.15
    assert abs(n / (billions * 1e9) - 1) < tol, n


def test_2p8b_dimensions():
    m = load_config(CONFIGS / "mamba_2.8b.json").model
    assert (m.d_model, m.n_layers, m.padded_vocab_size, m.d_mlp, m.parallel_residual) == (2560, 32, 50304, 10240, True)


def test_hybrid_keeps_attention_at_1_and_middle():
    m = load_config(CONFIGS / "mamba_410m_hybrid.json").model
    assert [i for i, s in enumerate(m.layer_symbols) if s == "*"] == [1, 11]
    assert load_config(CONFIGS / "mamba_410m_hybrid.json").model.d_model == 1024  # inherited from base


def test_round_trip_to_dict(tmp_path):
    cfg = load_config(CONFIGS / "tiny_hybrid.json")
    again = load_config(write(tmp_path, config_to_dict(cfg)))
    assert again == cfg


@pytest.mark.parametrize("data,key,reason", [
    (base_model(d_modle=3), "model.d_modle", "unknown key"),
    (base_model(d_model="64"), "model.d_model", "expected an integer"),
    (base_model(d_model=True), "model.d_model", "expected an integer"),
    (base_model(pattern="M*M"), "model.pattern", "has 3 layer symbols but n_layers is 2"),
    (base_model(pattern="MX"), "model.pattern", "unknown symbol 'X'"),
    (base_model(n_heads=5), "model.n_heads", "5 heads do not divide d_model 64"),
    (base_model(n_kv_heads=3), "model.n_kv_heads", "do not divide n_heads"),
    (base_model(mamba={"expand": 1.01}), "model.mamba.expand", "not a whole number"),
    (base_model(pattern="SS", mamba2={"head_dim": 48}), "model.mamba2.head_dim", "not divisible by head_dim 48"),
    (base_model(norm="batchnorm"), "model.norm", "must be one of"),
    ({**base_model(), "transfer": {"mode": "everything"}}, "transfer.mode", "is not one of"),
    ({**base_model(), "parallel": {"zero_stage": 4}}, "parallel.zero_stage", "must be 0, 1, 2 or 3"),
    ({**base_model(), "parallel": {"tp": 3}}, "parallel.tp", "not divisible by tp 3"),
    ({**base_model(), "train": {"betas": [0.9]}}, "train.betas", "expected 2 items"),
    ({"transfer": {}}, "model", "required key is missing"),
])
def test_bad_configs_name_file_key_and_reason(tmp_path, data, key, reason):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and reason in msg, msg


def test_invalid_json_and_missing_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"model": {')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 1"):
        load_config(p)
    with pytest.raises(ConfigError, match="nope.json: file not found"):
        load_config(tmp_path / "nope.json")


def test_base_inheritance_and_cycles(tmp_path):
    write(tmp_path, base_model(), "a.json")
    b = write(tmp_path, {"base": "a.json", "model": {"d_model": 128}}, "b.json")
    cfg = load_config(b)
    assert cfg.model.d_model == 128 and cfg.model.vocab_size == 100
    write(tmp_path, {"base": "d.json"}, "c.json")
    d = write(tmp_path, {"base": "c.json"}, "d.json")
    with pytest.raises(ConfigError, match="circular"):
        load_config(d)
