"""The trainer at TP x PP x DP layouts on CPU ranks (gloo), against the single-process run of the
same config: the first training losses and gradient norms agree (fp32, relative 1e-5), a
pipeline-parallel run stops and resumes exactly, and a non-finite gradient skips the update on
every rank. Run alone with `pytest -m multiprocess`."""

from __future__ import annotations

import json

import pytest

from megaxatl.config import config_from_dict
from megaxatl.train import run
from test_train_common import (REPO, assert_ok, continue_in, events, launch, make_init_dir, records,  # noqa: F401
                               tiny_config, train_shards, write_config)

pytestmark = pytest.mark.multiprocess
WORKER = REPO / "tests" / "train_fault_worker.py"


def assert_same_run(ref: dict, got: dict, steps, later_grad_tol: float = 1e-4):
    """Losses within 1e-5 (relative) at every step; gradient norms within 1e-6 at the first step
    (the same weights: this checks what the norm counts) and `later_grad_tol` after it (the
    gradient is more sensitive than the loss to the rounding differences TP's split sums
    accumulate)."""
    for s in steps:
        for key, tol in (("loss", 1e-5), ("grad_norm", 1e-6 if s == steps[0] else later_grad_tol)):
            a, b = ref[s][key], got[s][key]
            assert abs(a - b) <= tol * abs(a), f"step {s} {key}: single process {a}, parallel {b}"


def hybrid(out, shards, **over):
    """4 layers, every LCI mixer kind next to attention, '|' splitting two stages."""
    base = dict(model__n_layers=4, model__pattern="*M|SR", model__n_heads=4,
                model__mamba2={"d_state": 8, "head_dim": 16, "n_groups": 2},
                model__retention={"n_heads": 4}, train__steps=6, train__save_interval=3)
    return tiny_config(out, shards, **{**base, **over})


def test_tp2_pp2_matches_one_process_and_resumes_exactly(tmp_path, train_shards):
    data = hybrid(tmp_path / "one", train_shards,
                  transfer__freeze={"policy": "fixed", "unfreeze_step": 2, "warmup_steps": 2})
    make_init_dir(data, tmp_path / "init")
    data["train"]["init_from"] = str(tmp_path / "init")  # frozen transferred weights on both stages
    ref = run(config_from_dict(data))
    assert ref.completed

    data["parallel"] = {"tp": 2, "pp": 2}
    data["train"]["out_dir"] = str(tmp_path / "tp2pp2")
    cfg = write_config(tmp_path / "tp2pp2.json", data)
    assert_ok(launch(cfg, nproc=4, extra=["--stop-after", "3"]))
    # the step-3 checkpoint also resumes at other layouts (its layout-free weights and moments)
    pp4 = continue_in(tmp_path / "tp2pp2", tmp_path / "pp4", data, pp=4)
    pp4["model"]["pattern"] = "*MSR"  # '|' marks are layout: the model is the same
    one = continue_in(tmp_path / "tp2pp2", tmp_path / "tp1pp1", data)
    assert_ok(launch(cfg, nproc=4))
    got = records(tmp_path / "tp2pp2")
    assert sorted(got) == list(range(1, 7))
    assert_same_run(records(tmp_path / "one"), got, range(1, 7))
    start = [e for e in events(tmp_path / "tp2pp2") if e["event"] in ("start", "resume")]
    assert [e["event"] for e in start] == ["start", "resume"] and start[0]["layout"] == "TP 2 x PP 2 x DP 1"
    assert start[1]["optimizer"] == "restored" and "from_layout" not in start[1]

    assert_ok(launch(write_config(tmp_path / "pp4.json", pp4), nproc=4))
    run(config_from_dict(one))
    for folder, layout in (("pp4", "TP 1 x PP 4 x DP 1"), ("tp1pp1", "TP 1 x PP 1 x DP 1")):
        resumed = records(tmp_path / folder)
        assert_same_run(got, resumed, range(4, 7))  # the same-layout resume's losses and norms
        (event,) = [e for e in events(tmp_path / folder) if e["event"] == "resume"][-1:]
        assert event["optimizer"] == "restored (layout-free)" and event["layout"] == layout
        assert event["from_layout"].startswith("TP 2 x PP 2 x DP 1, ZeRO-0, fp32, layers 0-1 | 2-3 -> ")


@pytest.mark.parametrize("zero", [0, 2])
def test_tp2_dp2_matches_one_process_and_resumes_there(zero, tmp_path, train_shards):
    # DP 2 x micro-batch 4 reads the same 8 samples per step as one process with micro-batch 8.
    # One KV head and one Mamba-2 group: TP 2 holds a copy of each on both ranks, which the
    # gradient norm (and the clipping by it) must count once, from AdamW's parameters (ZeRO-0)
    # or from DeepSpeed's reduced fragments (ZeRO-2)
    data = tiny_config(tmp_path / "one", train_shards, model__pattern="*S", model__n_heads=4, model__n_kv_heads=1,
                       model__mamba2={"d_state": 8, "head_dim": 16, "n_groups": 1},
                       data__micro_batch_size=8, train__steps=5, train__save_interval=3)
    run(config_from_dict(data))
    one = json.loads(json.dumps(data))
    data["parallel"] = {"tp": 2, "zero_stage": zero}
    data["data"]["micro_batch_size"] = 4
    data["train"]["out_dir"] = str(tmp_path / "tp2dp2")
    assert_ok(launch(write_config(tmp_path / "c.json", data), nproc=4, extra=["--stop-after", "3"]))
    # ZeRO-2 partitions over 2 DP ranks -> one process, ZeRO-0: moments from the layout-free state
    resumed = continue_in(tmp_path / "tp2dp2", tmp_path / "resumed", one)
    run(config_from_dict(resumed))
    ref, got = records(tmp_path / "one"), {**records(tmp_path / "tp2dp2"), **records(tmp_path / "resumed")}
    assert sorted(got) == list(range(1, 6))
    assert ref[1]["grad_norm"] > config_from_dict(data).train.grad_clip  # clipping is on
    assert_same_run(ref, got, range(1, 6))
    (event,) = [e for e in events(tmp_path / "resumed") if e["event"] == "resume"]
    assert event["optimizer"] == "restored (layout-free)"
    assert event["from_layout"].startswith(f"TP 2 x PP 1 x DP 2, ZeRO-{zero}")


def test_pp2_zero1_tied_embedding_matches_one_process(tmp_path, train_shards):
    data = hybrid(tmp_path / "one", train_shards, model__tie_embeddings=True, model__pattern="*MSR",
                  train__grad_accum=2, train__steps=4)
    run(config_from_dict(data))
    data["parallel"] = {"pp": 2, "zero_stage": 1}
    data["train"]["out_dir"] = str(tmp_path / "pp2")
    assert_ok(launch(write_config(tmp_path / "c.json", data), nproc=2))
    ref, got = records(tmp_path / "one"), records(tmp_path / "pp2")
    for s in range(1, 5):
        assert abs(ref[s]["loss"] - got[s]["loss"]) <= 1e-5 * ref[s]["loss"], (s, ref[s], got[s])


def test_pipeline_skips_a_non_finite_step_on_every_rank(tmp_path, train_shards):
    data = hybrid(tmp_path / "pp2", train_shards, parallel__pp=2, train__steps=5, train__max_bad_steps=2)
    cfg = write_config(tmp_path / "c.json", data)
    proc = launch(cfg, nproc=2, script=WORKER, extra=["--fault", "nan", "--at", "2"])
    assert_ok(proc)
    got = records(tmp_path / "pp2")
    skips = [e for e in events(tmp_path / "pp2") if e["event"] == "skip"]
    assert len(skips) == 1 and "non-finite gradient" in skips[0]["reason"], skips
    assert got[5]["skipped"] == 1 and all(got[s]["loss"] == got[s]["loss"] for s in (1, 3, 4, 5))
    # two bad steps in a row stop the run, naming the last good checkpoint
    data["train"]["out_dir"] = str(tmp_path / "stop")
    proc = launch(write_config(tmp_path / "d.json", data), nproc=2, script=WORKER,
                  extra=["--fault", "nan", "--at", "4", "5"])
    assert proc.returncode != 0 and "2 non-finite gradients in a row at step 5" in proc.stderr  # torchrun: 1
    assert "step_00000003" in proc.stderr
    assert (tmp_path / "stop" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_world_size_must_be_tp_x_pp_x_dp(tmp_path, train_shards):
    data = tiny_config(tmp_path / "r", train_shards, parallel__tp=2, parallel__pp=2)
    proc = launch(write_config(tmp_path / "c.json", data), nproc=2)
    assert proc.returncode != 0
    assert "parallel" in proc.stderr and "not a multiple of tp x pp = 2 x 2 = 4" in proc.stderr
