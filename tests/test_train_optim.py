"""Param groups (decay / no-decay x transferred / fresh), the DeepSpeed config, --set overrides
and the FLOPs estimate; no DeepSpeed engine is started here."""

from __future__ import annotations

import pytest

from megaxatl.config import ConfigError, TrainConfig, config_from_dict
from megaxatl.models import build
from megaxatl.train.engine import ds_config
from megaxatl.train.metrics import flops_per_token
from megaxatl.train.optim import build_optimizer, param_groups
from megaxatl.train.overrides import apply_overrides, load_with_overrides


def model_cfg(**over):
    m = dict(vocab_size=100, d_model=32, n_layers=3, pattern="*MS", d_mlp=64, n_heads=2, mlp_bias=True,
             qkv_bias=True, mamba=dict(d_state=8), mamba2=dict(d_state=8, head_dim=16, chunk_size=8))
    m.update(over)
    return config_from_dict({"model": m})


def by_role(groups):
    return {g["role"]: set(g["names"]) for g in groups}


def test_no_decay_groups_hold_A_log_D_norms_biases_and_embeddings():
    cfg = model_cfg()
    model = build(cfg)
    groups = param_groups(model, [], TrainConfig())
    roles = by_role(groups)
    assert set(roles) == {"fresh/decay", "fresh/no_decay"}
    nd, d = roles["fresh/no_decay"], roles["fresh/decay"]
    for name in ("layers.1.mixer.A_log", "layers.1.mixer.D", "layers.2.mixer.A_log", "layers.2.mixer.D",
                 "layers.0.norm1.weight", "layers.0.norm1.bias", "norm_f.weight", "layers.2.mixer.norm.weight",
                 "layers.0.mlp.up_proj.bias", "layers.0.mixer.q_proj.bias", "layers.1.mixer.dt_proj.bias",
                 "layers.1.mixer.conv1d.bias", "embed.weight"):
        assert name in nd, name
    for name in ("layers.0.mlp.up_proj.weight", "layers.0.mixer.o_proj.weight", "layers.1.mixer.in_proj.weight",
                 "lm_head.weight"):
        assert name in d, name
    assert all(len(p.shape) >= 2 for g in groups if g["role"] == "fresh/decay" for p in g["params"])
    assert {g["role"]: g["weight_decay"] for g in groups} == {"fresh/decay": 0.1, "fresh/no_decay": 0.0}
    # every parameter exactly once
    assert sum(len(g["names"]) for g in groups) == len(list(model.parameters()))


def test_decay_embeddings_flag_and_transferred_split():
    cfg = model_cfg()
    model = build(cfg)
    transferred = ["embed.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.up_proj.bias", "norm_f.weight"]
    roles = by_role(param_groups(model, transferred, TrainConfig(decay_embeddings=True)))
    assert roles["transferred/decay"] == {"embed.weight", "layers.0.mlp.up_proj.weight"}
    assert roles["transferred/no_decay"] == {"layers.0.mlp.up_proj.bias", "norm_f.weight"}
    assert not set(transferred) & (roles["fresh/decay"] | roles["fresh/no_decay"])
    with pytest.raises(ValueError, match="not in the model"):
        param_groups(model, ["layers.9.mlp.up_proj.weight"], TrainConfig())


def test_tied_embedding_is_one_parameter_in_one_group():
    model = build(model_cfg(tie_embeddings=True))
    groups = param_groups(model, [], TrainConfig())
    names = [n for g in groups for n in g["names"]]
    assert names.count("embed.weight") == 1 and not any(n.startswith("lm_head") for n in names)
    opt = build_optimizer(groups, TrainConfig())
    assert [g["role"] for g in opt.param_groups] == [g["role"] for g in groups]


def test_ds_config_maps_our_sections():
    cfg = config_from_dict({"model": dict(vocab_size=100, d_model=32, n_layers=1, pattern="M", d_mlp=64),
                            "parallel": {"zero_stage": 3, "cpu_offload": True},
                            "data": {"micro_batch_size": 3}, "train": {"grad_accum": 2, "grad_clip": 0.5, "dtype": "bf16"}})
    ds = ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    # the StepGuard clips (train.grad_clip) by the exact norm; DeepSpeed's own clipping stays off
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"


def test_set_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"model": {"vocab_size": 100, "d_model": 32, "n_layers": 1, "pattern": "M", "d_mlp": 64}}')
    cfg = load_with_overrides(path, ["train.steps=7", "train.betas=[0.9,0.99]", "train.out_dir=runs/x",
                                     "transfer.freeze.policy=lit", "train.init_from=null"])
    assert cfg.train.steps == 7 and cfg.train.betas == (0.9, 0.99) and cfg.train.out_dir == "runs/x"
    assert cfg.transfer.freeze.policy == "lit" and cfg.train.init_from is None
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key"):
        load_with_overrides(path, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"c\.json.*train\.steps: expected an integer"):
        load_with_overrides(path, ["train.steps=many"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["train.steps"])


def test_flops_per_token_is_6n_plus_mixer_terms():
    cfg = config_from_dict({"model": dict(vocab_size=1000, d_model=64, n_layers=2, pattern="*M", d_mlp=128,
                                          n_heads=4, mamba=dict(d_state=16)), "data": {"seq_len": 128}})
    model = build(cfg)
    n_matmul = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    attn = 12 * 1 * 4 * 16 * 128 / 2
    ssm = 27 * 1 * 128 * 16
    assert flops_per_token(cfg) == pytest.approx(6 * n_matmul + attn + ssm)
