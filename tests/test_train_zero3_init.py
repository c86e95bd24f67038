"""ZeRO-3 builds the LM unit by unit into DP partitions (train/init.materialize_partitioned): no rank
ever holds the whole model. Two DP ranks on CPU (gloo; with TP 2, four): the gathered parameters
are the TP 1 x PP 1 scratch init bit for bit, the construction's peak is the partitions plus one unit, and training
from it gives the losses of a ZeRO-1 run of the same config; in bf16 the fp32-master parameters
keep their fp32 init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megaxatl.config import config_from_dict
from megaxatl.models import build
from test_train_common import assert_ok, launch, losses, tiny_config, train_shards, write_config  # noqa: F401

WORKER = Path(__file__).resolve().parent / "zero3_init_worker.py"


def config(out, shards, **over):
    # 4 layers: the model is several units, so "one unit beyond the partitions" is well below it
    return tiny_config(out, shards, model__n_layers=4, model__pattern="*M*M", train__seed=5, **over)


@pytest.mark.parametrize("tie,tp", [(True, 1), (False, 1), (False, 2)])
def test_zero3_two_dp_ranks_build_the_scratch_init_without_the_whole_model(tmp_path, train_shards, tie, tp):
    """tp 2: four ranks, TP 2 x DP 2; rank 0's TP part is partitioned over its DP group."""
    from megaxatl.checkpoint.sharded import check_layout
    from megaxatl.parallel.tp_rules import shard_tensor

    data = config(tmp_path / "run", train_shards, parallel__zero_stage=3, parallel__tp=tp, model__tie_embeddings=tie)
    path = write_config(tmp_path / "c.json", data)
    assert_ok(launch(path, nproc=2 * tp, script=WORKER, extra=["--out", str(tmp_path / "got")], timeout=400))
    got = load_file(str(tmp_path / "got" / "weights.safetensors"))
    cfg = config_from_dict(data)
    layout = check_layout(cfg.model, tp, 1)
    want = {n: shard_tensor(n, p.detach(), layout.rules[n], 0, tp) if tp > 1 else p.detach()
            for n, p in build(cfg, seed=cfg.train.seed).named_parameters()}  # tied: once
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].equal(w), name
    c = json.loads((tmp_path / "got" / "construction.json").read_text())
    assert c["model_elements"] == sum(w.numel() for w in want.values()) and c["dp"] == 2
    partitions = -(-c["model_elements"] // c["dp"]) + 64 * len(want)  # ZeRO pads each partition a little
    assert c["peak_elements"] <= partitions + c["largest_unit"], c
    assert c["peak_elements"] < c["model_elements"], c


def test_zero3_built_by_units_trains_like_zero1(tmp_path, train_shards):
    got = {}
    for stage in (1, 3):
        data = config(tmp_path / f"z{stage}", train_shards, parallel__zero_stage=stage, train__steps=3,
                      train__save_interval=100, train__eval_interval=100)
        assert_ok(launch(write_config(tmp_path / f"z{stage}.json", data), nproc=2))
        got[stage] = losses(tmp_path / f"z{stage}")
    assert sorted(got[3]) == [1, 2, 3]
    assert got[3][1] == got[1][1], got  # the same initial weights: the first loss exactly
    assert all(abs(got[3][s] - got[1][s]) <= 1e-5 * got[1][s] for s in (2, 3)), got


def test_zero3_bf16_keeps_the_fp32_init_of_the_marked_parameters(tmp_path, train_shards):
    """bf16: each unit is cast before it is partitioned (DeepSpeed casts a ZeRO-Init model no more);
    the keeps_fp32 parameters' masters still start from their fp32 values, taken before the cast."""
    import deepspeed
    import torch

    from megaxatl.models.params import keeps_fp32
    from megaxatl.train.deepspeed_internals import param_shape
    from megaxatl.train.trainer import Trainer

    data = tiny_config(tmp_path / "run", train_shards, train__dtype="bf16", train__steps=2, train__eval_interval=100,
                       train__save_interval=100, parallel__zero_stage=3, model__n_layers=3, model__pattern="M*S",
                       model__mamba2={"d_state": 8, "head_dim": 16, "chunk_size": 8})
    cfg = config_from_dict(data)
    want = {n: p.detach() for n, p in build(cfg, seed=cfg.train.seed).named_parameters()}
    trainer = Trainer(cfg)
    try:
        named = dict(trainer.built.named)
        marked = sorted(n for n, p in named.items() if keeps_fp32(p))
        assert len(marked) == 6
        for n, p in named.items():
            assert hasattr(p, "ds_id") and p.dtype == torch.bfloat16, n
            with deepspeed.zero.GatheredParameters([p]):
                assert torch.equal(p.detach(), want[n].to(torch.bfloat16)), n
        for n in marked:
            master = trainer.opt_view.master(named[n]).reshape(param_shape(named[n]))
            assert master.dtype == torch.float32 and torch.equal(master, want[n]), n
        res = trainer.fit()
        assert res.completed and res.step == 2
    finally:
        trainer.close()


@pytest.mark.parametrize("source", ["init_from", "donor"])
def test_zero3_fills_from_a_weights_folder_or_a_donor_unit_by_unit(tmp_path, train_shards, source):
    """The fills called once per unit under ZeRO-3 give the values of one call (ZeRO-0's build)."""
    import deepspeed
    import torch

    from megaxatl.train.trainer import Trainer
    from test_train_common import make_init_dir

    data = tiny_config(tmp_path / "w", train_shards, train__steps=1)
    if source == "init_from":
        make_init_dir(data, tmp_path / "init")
        data["train"]["init_from"] = str(tmp_path / "init")
    else:
        pytest.importorskip("transformers")
        from fixtures_donors import make_tiny_donor
        from megaxatl.donors import open_donor
        from megaxatl.transfer import model_dict_from_donor

        _, donor = make_tiny_donor("gpt_neox", tmp_path / "neox", vocab_size=300)
        data["model"] = model_dict_from_donor(open_donor(donor).spec, "*M", mamba={"d_state": 8})
        data["transfer"] = {"donor": str(donor)}
    got = {}
    for stage in (0, 3):
        data["train"]["out_dir"] = str(tmp_path / f"z{stage}")
        data["parallel"] = {"zero_stage": stage}
        trainer = Trainer(config_from_dict(data))
        try:
            assert trainer.source_kind.startswith(source)
            got[stage] = {}
            for n, p in trainer.built.named:
                with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
                    got[stage][n] = p.detach().clone()
            if stage == 3:
                assert trainer.transferred == transferred and trainer.report == report
            transferred, report = trainer.transferred, trainer.report
        finally:
            trainer.close()
    assert set(got[3]) == set(got[0]) and transferred
    assert all(torch.equal(got[3][n], got[0][n]) for n in got[0]), [n for n in got[0] if not got[3][n].equal(got[0][n])]
