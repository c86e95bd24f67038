"""Layout-free initialisation: every parameter's starting value depends on its global name and the
seed only. Each virtual rank of a TP x PP layout fills only its own part (as the trainer does on a
meta-device model); gathering the parts gives build(cfg, seed), the TP 1 x PP 1 model, bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megaxatl.checkpoint.sharded import check_layout, local_chunks, local_shape
from megaxatl.models import build
from megaxatl.models.lm import build_unit, unit_seed
from megaxatl.parallel.tp_rules import unshard
from megaxatl.train.init import fill_scratch, local_names, materialize
from test_parallel_tp import make_cfg


def nan_local(layout, par) -> dict[str, torch.Tensor]:
    """This virtual rank's tensors at their local shapes, NaN until a fill writes them."""
    local = {}
    for name in local_names(layout, par):
        shape = layout.shapes[name]
        local[name] = torch.full(local_shape(shape, local_chunks(name, layout.rules[name], shape, par.tp_rank, par.tp)),
                                 float("nan"))
    return local


def rank_parts(cfg, tp: int, pp: int, seed: int) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    layout = check_layout(cfg.model, tp, pp)
    out = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            par = SimpleNamespace(tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank)
            local = nan_local(layout, par)
            fill_scratch(cfg, seed, local, layout, par)
            out[(pp_rank, tp_rank)] = local
    return out


@pytest.mark.parametrize("name", ["mqa_groups1", "gqa_groups2"])
def test_tp2_pp2_parts_gather_to_the_tp1_model_bit_for_bit(name):
    cfg = make_cfg(name)
    whole = dict(build(cfg, seed=11).named_parameters())
    layout = check_layout(cfg.model, 2, 2)
    parts = rank_parts(cfg, 2, 2, seed=11)
    seen = set()
    for key in layout.shapes:
        stages = [s for s in range(2) if key in parts[(s, 0)]]
        assert stages, f"{key} held by no stage"
        for s in stages:  # a tied embedding is held by the first and last stage: the same values
            got = unshard(key, [parts[(s, r)][key] for r in range(2)], layout.rules[key])
            assert torch.equal(got, whole[key].detach()), key
        seen.add(key)
    assert seen == set(whole)
    # each stage holds only its own units
    assert all(k.startswith(("embed", "layers.0", "layers.1", "layers.2")) for k in parts[(0, 0)])
    # another seed changes the values
    other = dict(build(cfg, seed=12).named_parameters())
    assert not torch.equal(other["embed.weight"], whole["embed.weight"])


def test_unit_values_do_not_depend_on_order_or_global_rng():
    cfg = make_cfg("gqa_groups2")
    torch.manual_seed(0)
    a = dict(build_unit(cfg, "layers.3", seed=5).named_parameters())
    torch.manual_seed(123)
    torch.randn(1000)
    build_unit(cfg, "layers.1", seed=5)
    b = dict(build_unit(cfg, "layers.3", seed=5).named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert unit_seed(5, "layers.3") != unit_seed(5, "layers.1") != unit_seed(6, "layers.1")
    # mixer-specific init survives (dt_proj bias from dt_min/dt_max, A_log = log(1..d_state))
    m = dict(build_unit(cfg, "layers.4", seed=5).named_parameters())  # 'M': Mamba-1
    assert torch.equal(m["mixer.A_log"][0], torch.log(torch.arange(1, 9, dtype=torch.float32)))


def test_materialize_gives_storage_only_to_this_ranks_stage_and_keeps_markers():
    from megaxatl.models.params import is_no_decay, keeps_fp32

    cfg = make_cfg("mqa_groups1")
    with torch.device("meta"):
        lm = build(cfg)
    layout = check_layout(cfg.model, 1, 2)
    par = SimpleNamespace(tp=1, pp=2, tp_rank=0, pp_rank=1)
    ids = {n: id(p) for n, p in lm.named_parameters()}
    local = materialize(lm, local_names(layout, par), layout, par,
                        lambda loc, lay, pr: fill_scratch(cfg, 3, loc, lay, pr))
    whole = dict(build(cfg, seed=3).named_parameters())
    for n, p in lm.named_parameters():
        assert id(p) == ids[n]  # the same Parameter objects: the pipeline's name map stays valid
        if n in local:
            assert p.device.type == "cpu" and torch.equal(p, whole[n]), n
        else:
            assert p.device.type == "meta", n
    assert "embed.weight" in local  # tied: the last stage holds the head's copy
    assert "layers.0.norm1.weight" not in local
    assert is_no_decay(lm.embed.weight)
    a_log = [n for n in local if n.endswith("A_log")]
    assert a_log and all(keeps_fp32(local[n]) for n in a_log)
    # the rotary buffers of this stage's attention blocks are real, the same as a plain build's
    rot = [(n, b) for n, b in lm.named_buffers() if n.startswith(("layers.3", "layers.4"))]
    for n, b in rot:
        assert b.device.type == "cpu" and torch.equal(b, dict(build(cfg).named_buffers())[n]), n


def test_init_from_a_sharded_folder_reads_and_verifies_only_this_ranks_files(tmp_path, monkeypatch):
    """A sharded model folder at TP 2 x PP 2: each virtual rank fills its parameters from its own
    slices; a stage-0 rank opens neither of stage 1's files, so damage there fails stage 1 only."""
    from megaxatl.checkpoint import CheckpointError
    from megaxatl.checkpoint import sharded
    from megaxatl.checkpoint.reshard import DictSource
    from megaxatl.config import config_to_dict
    from megaxatl.parallel.tp_rules import shard_tensor
    from megaxatl.train.init import _from_weights

    cfg = make_cfg("gqa_groups2")
    whole = {k: v.detach().add(0.25) for k, v in build(cfg, seed=4).state_dict().items()}  # not the init
    layout = check_layout(cfg.model, 2, 2)
    sharded.save_sharded_dir(tmp_path / "w", DictSource(whole), layout, config_to_dict(cfg), {"transferred": ["x"]})
    hashed = []
    real = sharded.sha256_file
    monkeypatch.setattr(sharded, "sha256_file", lambda f: hashed.append(f.name) or real(f))

    def fill(tp_rank, pp_rank):
        par = SimpleNamespace(tp=2, pp=2, tp_rank=tp_rank, pp_rank=pp_rank)
        local = nan_local(layout, par)
        initial = _from_weights(cfg, tmp_path / "w")
        assert initial.transferred == ["x"]
        initial.fill(local, layout, par)
        for name, t in local.items():
            assert torch.equal(t, shard_tensor(name, whole[name], layout.rules[name], tp_rank, 2)), name
        return local

    for tp_rank in range(2):
        hashed.clear()
        fill(tp_rank, 0)
        assert not {"__2_0.distcp", "__3_0.distcp"} & set(hashed), hashed
    with open(tmp_path / "w" / "__3_0.distcp", "r+b") as f:  # stage 1, TP rank 1's file
        f.seek(-3, 2)
        f.write(b"xyz")
    fill(0, 0)  # untouched: stage 0 never reads it
    with pytest.raises(CheckpointError, match=r"__3_0.distcp: checksum mismatch"):
        fill(1, 1)


@pytest.mark.parametrize("tp,pp,extra", [
    (2, 1, {"pos_embed": True}),  # learned positions: pipeline stages refuse them
    (2, 2, {}),
])
def test_newer_family_options_gather_to_the_tp1_model(tp, pp, extra):
    """The donor-family model options (scaled embedding, (1+w) norms, sandwich norms, q/k norm, a
    sliding-window layer, learned positions) under the per-unit init: each unit is built exactly as
    the whole model builds it, so the parts gather to build(cfg, seed) and (1+w) norms start at 0."""
    from megaxatl.config import config_from_dict

    model = {"vocab_size": 395, "pad_vocab_multiple": 8, "d_model": 32, "n_layers": 4, "pattern": "*WM*",
             "d_mlp": 64, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "norm_placement": "sandwich", "norm": "rmsnorm",
             "norm_unit_offset": True, "embed_scale": 5.6, "qk_norm": "head", "local_attention": {"window": 8},
             "mamba": {"d_state": 8, "expand": 2.0}, **extra}
    cfg = config_from_dict({"model": model})
    whole = dict(build(cfg, seed=3).named_parameters())
    plain = dict(build(cfg).named_parameters())  # the global-RNG init: same classes, same constant inits
    assert torch.equal(whole["norm_f.weight"], plain["norm_f.weight"])
    assert torch.count_nonzero(whole["norm_f.weight"]) == 0  # (1 + w): zeros are the identity
    layout = check_layout(cfg.model, tp, pp)
    parts = rank_parts(cfg, tp, pp, seed=3)
    for key in layout.shapes:
        stages = [s for s in range(pp) if key in parts[(s, 0)]]
        assert stages, f"{key} held by no stage"
        for s in stages:
            got = unshard(key, [parts[(s, r)][key] for r in range(tp)], layout.rules[key])
            assert torch.equal(got, whole[key].detach()), key
    assert set(layout.shapes) == set(whole)


def test_donor_start_at_tp2_pp2_streams_only_local_tensors_and_gathers_to_from_donor(tmp_path, monkeypatch):
    """The trainer's transfer.donor start: each virtual rank of TP 2 x PP 2 fills its own part from
    the streamed transfer (no whole target is built: from_donor is not called), reads the donor
    tensors of its own stage only, and the parts gather to from_donor's model bit for bit, with
    the same report on every rank."""
    pytest.importorskip("transformers")
    from fixtures_donors import make_tiny_donor
    from megaxatl.config import config_from_dict
    from megaxatl.donors import open_donor
    import megaxatl.transfer as transfer_pkg
    from megaxatl.transfer import api, from_donor, model_dict_from_donor
    from megaxatl.transfer.stream import TransferSource
    from megaxatl.train.init import _from_donor

    _, donor = make_tiny_donor("llama", tmp_path / "ll", num_hidden_layers=4, vocab_size=203)
    spec = open_donor(donor).spec
    data = {"model": model_dict_from_donor(spec, "*M*S", pad_vocab_multiple=8, mamba={"d_state": 8},
                                           mamba2={"d_state": 8, "head_dim": 16, "n_groups": 2}),
            "transfer": {"donor": str(donor)}, "train": {"seed": 7}}
    cfg = config_from_dict(data)
    want_model, want_report = from_donor(donor, config_from_dict(data), seed=7)
    whole = {n: p.detach() for n, p in want_model.named_parameters()}

    def no_whole_target(*a, **k):
        raise AssertionError("the donor start built the whole target")
    monkeypatch.setattr(api, "from_donor", no_whole_target)
    monkeypatch.setattr(transfer_pkg, "from_donor", no_whole_target)
    read: list[str] = []
    real_read = TransferSource.read
    monkeypatch.setattr(TransferSource, "read", lambda self, key: read.append(key) or real_read(self, key))

    layout = check_layout(cfg.model, 2, 2)
    parts = {}
    for pp_rank in range(2):
        for tp_rank in range(2):
            par = SimpleNamespace(tp=2, pp=2, tp_rank=tp_rank, pp_rank=pp_rank)
            local = nan_local(layout, par)
            initial = _from_donor(cfg, None)
            read.clear()
            initial.fill(local, layout, par)
            assert sorted(read) == sorted(local), (pp_rank, tp_rank)  # its own tensors, each once
            assert initial.transferred == list(want_report.transferred)
            assert initial.report == want_report.to_dict()
            parts[(pp_rank, tp_rank)] = local
    assert not any(k.startswith("layers.3") for k in parts[(0, 0)])  # stage 0 never reads stage 1's layers
    for key in layout.shapes:
        stages = [s for s in range(2) if key in parts[(s, 0)]]
        assert stages, key
        for s in stages:
            got = unshard(key, [parts[(s, r)][key] for r in range(2)], layout.rules[key])
            assert torch.equal(got, whole[key]), key
    assert want_report.transferred and any(k.startswith("layers.3") for k in want_report.transferred)
