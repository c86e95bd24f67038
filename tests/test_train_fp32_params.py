"""bf16 training keeps A_log, D and the dt biases fp32 in the forward: after the trainer's engine
set-up (DeepSpeed has cast every parameter to bf16) what the mixers read is the fp32 master,
exactly, before and after optimizer steps, and a bf16 forward equals the same mixer holding those
parameters in fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from megaxatl.config import config_from_dict
from megaxatl.models.params import FP32_MASTER, fp32, keeps_fp32
from megaxatl.train.trainer import Trainer
from test_train_common import tiny_config, train_shards  # noqa: F401 (fixture)


def masters(trainer) -> dict[str, torch.Tensor]:
    return {n: trainer.opt_view.master(p).reshape(p.shape).clone() for n, p in trainer.built.named if keeps_fp32(p)}


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_forward_reads_the_fp32_masters(tmp_path, train_shards, zero_stage):
    data = tiny_config(tmp_path / "run", train_shards, train__dtype="bf16", train__steps=2, train__eval_interval=100,
                       train__save_interval=100, parallel__zero_stage=zero_stage, model__n_layers=3,
                       model__pattern="M*S", model__mamba2={"d_state": 8, "head_dim": 16, "chunk_size": 8})
    trainer = Trainer(config_from_dict(data))
    try:
        named = dict(trainer.built.named)
        marked = sorted(n for n, p in named.items() if keeps_fp32(p))
        assert marked == ["layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_proj.bias",
                          "layers.2.mixer.A_log", "layers.2.mixer.D", "layers.2.mixer.dt_bias"]
        before = masters(trainer)
        for n in marked:
            p = named[n]
            assert p.dtype == torch.bfloat16, n  # DeepSpeed's bf16 cast
            assert fp32(p).dtype == torch.float32 and torch.equal(fp32(p), before[n]), n
        # the masters are not bf16 numbers (A_log = log 1..N, dt biases): the bf16 copies differ
        assert sum(not torch.equal(before[n], named[n].float()) for n in marked) >= 4

        torch.manual_seed(0)
        x = (4 * torch.randn(2, 64, 32)).to(torch.bfloat16)
        for i in (0, 2):
            mixer = trainer.built.lm.layers[i].mixer
            # the reference: the same mixer holding these parameters in fp32 (their masters); and the
            # same mixer reading their bf16 copies, what the mark prevents (a deep copy of a
            # Parameter keeps no attributes: neither the mark nor the master)
            ref, stale = copy.deepcopy(mixer), copy.deepcopy(mixer)
            for name, q in mixer.named_parameters():
                if keeps_fp32(q):
                    owner, _, leaf = name.rpartition(".")
                    fp32_param = torch.nn.Parameter(before[f"layers.{i}.mixer.{name}"].clone())
                    (ref.get_submodule(owner) if owner else ref)._parameters[leaf] = fp32_param
            with torch.no_grad():
                y, ref_y, stale_y = mixer(x)[0], ref(x)[0], stale(x)[0]
            assert y.dtype == torch.bfloat16
            assert all(q.dtype == torch.float32 for n, q in ref.named_parameters() if n in ("A_log", "D", "dt_bias",
                                                                                            "dt_proj.bias"))
            assert torch.equal(y, ref_y), i
            assert not torch.equal(y, stale_y), i

        res = trainer.fit()
        assert res.completed and res.step == 2
        after = masters(trainer)
        assert any(not torch.equal(after[n], before[n]) for n in marked)  # the optimizer stepped them
        for n in marked:
            assert torch.equal(fp32(named[n]), after[n]), n  # and the forward reads the new values
    finally:
        trainer.close()
    assert not any(hasattr(p, FP32_MASTER) for p in named.values())  # closed: nothing stale left


def test_fp32_training_attaches_nothing(tmp_path, train_shards):
    data = tiny_config(tmp_path / "run", train_shards, train__steps=1)
    trainer = Trainer(config_from_dict(data))
    try:
        assert trainer.fp32.params == []
        assert all(p.dtype == torch.float32 and not hasattr(p, FP32_MASTER) for _, p in trainer.built.named)
    finally:
        trainer.close()
