"""Resuming at another layout: a checkpoint's layout-free weights and AdamW moments
(train/portable.py) continue the run with the same losses (fp32, relative 1e-5) as resuming at the
layout that wrote it; without moments the optimizer restarts and the resume event says so."""

from __future__ import annotations

import pytest

from megaxatl.config import config_from_dict
from megaxatl.train import run
from test_train_common import continue_in, events, records, reseal, tiny_config, train_shards  # noqa: F401


def assert_same(ref: dict, got: dict, steps, keys=("loss",)):
    for s in steps:
        for key in keys:
            a, b = ref[s][key], got[s][key]
            assert abs(a - b) <= 1e-5 * abs(a), f"step {s} {key}: reference {a}, resumed {b}"


def resumes(out_dir) -> list[dict]:
    return [e for e in events(out_dir) if e["event"] == "resume"]


def test_zero_stage_changes_keep_weights_and_moments(tmp_path, train_shards):
    """ZeRO-1 (flat fp32 partitions) -> ZeRO-3 (partitioned parameters) -> ZeRO-0 (torch AdamW
    state): the moments cross every way and every loss equals the uninterrupted run's."""
    data = tiny_config(tmp_path / "ref", train_shards, train__steps=6, train__save_interval=2)
    run(config_from_dict(data))
    ref = records(tmp_path / "ref")

    data["train"]["out_dir"] = str(tmp_path / "a")
    data["parallel"] = {"zero_stage": 1}
    run(config_from_dict(data), stop_after=2)
    b = continue_in(tmp_path / "a", tmp_path / "b", data, zero_stage=3)
    run(config_from_dict(b), stop_after=4)
    c = continue_in(tmp_path / "b", tmp_path / "c", data, zero_stage=0)
    res = run(config_from_dict(c))
    assert res.completed and res.resumed_from == 4
    got = {**records(tmp_path / "a"), **records(tmp_path / "b"), **records(tmp_path / "c")}
    assert sorted(got) == list(range(1, 7))
    assert_same(ref, got, range(1, 7))
    (to_zero3,), (to_zero0,) = resumes(tmp_path / "b")[-1:], resumes(tmp_path / "c")[-1:]
    assert to_zero3["optimizer"] == "restored (layout-free)"
    assert to_zero3["from_layout"] == "TP 1 x PP 1 x DP 1, ZeRO-1, fp32 -> TP 1 x PP 1 x DP 1, ZeRO-3, fp32"
    assert to_zero0["optimizer"] == "restored (layout-free)" and "ZeRO-3, fp32 -> " in to_zero0["from_layout"]


def test_without_saved_moments_the_optimizer_restarts_and_says_so(tmp_path, train_shards):
    data = tiny_config(tmp_path / "a", train_shards, train__steps=4, train__save_interval=2,
                       train__portable_optimizer=False)
    run(config_from_dict(data), stop_after=2)
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
    assert (ckpt / "weights").is_dir() and not (ckpt / "optimizer").exists()
    b = continue_in(tmp_path / "a", tmp_path / "b", data, zero_stage=1)
    res = run(config_from_dict(b))
    assert res.completed
    (event,) = resumes(tmp_path / "b")
    assert event["optimizer"] == ("restarted: the checkpoint has no layout-free optimizer state "
                                  "(train.portable_optimizer was false)")
    # same-layout resume of the original as the reference: step 3's loss is a forward pass on the
    # step-2 weights, so it matches; step 4 follows an update with fresh moments, so it does not
    run(config_from_dict(data))
    ref, got = records(tmp_path / "a"), records(tmp_path / "b")
    assert_same(ref, got, [3])
    assert abs(ref[4]["loss"] - got[4]["loss"]) > 1e-4 * ref[4]["loss"]


def test_bf16_master_weights_and_moments_cross_to_zero1(tmp_path, train_shards):
    """bf16: ZeRO-0 (DeepSpeed's per-parameter fp32 copies) -> ZeRO-1 (flat partitions): the fp32
    master weights, not the bf16-rounded parameters, continue, so the losses are the same-layout
    run's."""
    data = tiny_config(tmp_path / "ref", train_shards, train__steps=4, train__save_interval=2, train__dtype="bf16")
    run(config_from_dict(data))
    data["train"]["out_dir"] = str(tmp_path / "a")
    run(config_from_dict(data), stop_after=2)
    b = continue_in(tmp_path / "a", tmp_path / "b", data, zero_stage=1)
    run(config_from_dict(b))
    assert_same(records(tmp_path / "ref"), records(tmp_path / "b"), (3, 4))
    assert resumes(tmp_path / "b")[0]["optimizer"] == "restored (layout-free)"


def test_a_corrupt_layout_free_shard_is_named_and_the_checkpoint_kept(tmp_path, train_shards):
    from megaxatl.checkpoint import CheckpointError, verify_sharded_dir

    data = tiny_config(tmp_path / "a", train_shards, train__steps=4, train__save_interval=2)
    run(config_from_dict(data), stop_after=2)
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
    for part in ("weights", "optimizer"):  # both carry every file's checksum
        assert verify_sharded_dir(ckpt / part)["layout"] == {"tp": 1, "pp": 1}
    shard = ckpt / "weights" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(raw))
    b = continue_in(tmp_path / "a", tmp_path / "b", data, zero_stage=1)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: checksum mismatch"):
        run(config_from_dict(b))
    kept = tmp_path / "b" / "checkpoints"
    assert (kept / "latest").read_text().strip() == "step_00000002" and (kept / "step_00000002" / "weights").is_dir()


def test_a_checkpoint_without_layout_free_weights_resumes_only_at_its_layout(tmp_path, train_shards):
    import shutil

    from megaxatl.config import ConfigError

    data = tiny_config(tmp_path / "a", train_shards, train__steps=4, train__save_interval=2)
    run(config_from_dict(data), stop_after=2)
    b = continue_in(tmp_path / "a", tmp_path / "b", data, zero_stage=1)
    ck = tmp_path / "b" / "checkpoints" / "step_00000002"
    shutil.rmtree(ck / "weights")  # a checkpoint as written without weights/: sealed without it
    reseal(ck)
    with pytest.raises(ConfigError, match=r"parallel.*no layout-free weights/.*\(TP 1 x PP 1 x DP 1, ZeRO-0, fp32\)"):
        run(config_from_dict(b))


def test_layout_free_checkpoints_alone_resume_exactly(tmp_path, train_shards):
    """train.save_deepspeed_state false: checkpoints hold only the layout-free state, and a resume
    at the same layout gives the uninterrupted run's losses bit for bit."""
    from megaxatl.config import ConfigError

    data = tiny_config(tmp_path / "full", train_shards, train__steps=6, train__save_interval=2,
                       train__save_deepspeed_state=False)
    run(config_from_dict(data))
    data["train"]["out_dir"] = str(tmp_path / "split")
    run(config_from_dict(data), stop_after=3)
    ckpt = tmp_path / "split" / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["megaxatl.json", "megaxatl_rank0.pt", "optimizer", "weights"]
    res = run(config_from_dict(data))
    assert res.completed and res.resumed_from == 3
    full, split = records(tmp_path / "full"), records(tmp_path / "split")
    assert [full[s]["loss"] for s in range(1, 7)] == [split[s]["loss"] for s in range(1, 7)]
    (event,) = resumes(tmp_path / "split")
    assert event["optimizer"] == "restored (layout-free)" and "(layout-free checkpoint) -> " in event["from_layout"]
    data["train"]["portable_optimizer"] = False
    with pytest.raises(ConfigError, match="save_deepspeed_state.*portable_optimizer"):
        config_from_dict(data)


def test_which_changes_need_the_layout_free_path():
    from megaxatl.train.checkpoint import layout_change

    base = {"tp": 1, "pp": 2, "dp": 2, "zero_stage": 0, "dtype": "fp32", "bounds": [[0, 2], [2, 4]]}
    assert layout_change(base, dict(base)) is None
    assert layout_change(base, {**base, "dp": 4}) is None  # fp32 ZeRO-0: every DP rank holds it all
    assert layout_change(base, {**base, "bounds": [[0, 1], [1, 4]]}) == (
        "TP 1 x PP 2 x DP 2, ZeRO-0, fp32, layers 0-1 | 2-3 -> TP 1 x PP 2 x DP 2, ZeRO-0, fp32, layers 0 | 1-3")
    bf16 = {**base, "dtype": "bf16"}  # DeepSpeed's bf16 optimizer of pipeline stages partitions over DP
    assert layout_change(bf16, {**bf16, "dp": 4}) is not None
    assert layout_change({**base, "zero_stage": 1}, {**base, "zero_stage": 1, "dp": 4}) is not None
    assert layout_change({**base, "engine_state": False}, dict(base)).endswith("(layout-free checkpoint) -> "
                                                                               + "TP 1 x PP 2 x DP 2, ZeRO-0, fp32, layers 0-1 | 2-3")


def _agreed_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from megaxatl.checkpoint import CheckpointError
    from megaxatl.checkpoint.agree import agreed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with agreed():
            if rank == 1:
                raise CheckpointError("ckpt/weights/__1_0.distcp: checksum mismatch")
        result = "no error"
    except CheckpointError as e:
        result = str(e)
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(result)


def test_a_read_error_on_one_rank_stops_every_rank(tmp_path):
    """A corrupt shard read by one rank only: every rank raises (none waits in a collective for
    the one that stopped), the reader with its own error naming the file, the others with it too."""
    import torch.multiprocessing as mp
    from test_parallel_tp import _free_port

    mp.spawn(_agreed_worker, args=(2, _free_port(), str(tmp_path / "r")), nprocs=2, join=True)
    assert (tmp_path / "r.1").read_text() == "ckpt/weights/__1_0.distcp: checksum mismatch"
    assert (tmp_path / "r.0").read_text() == "ckpt/weights/__1_0.distcp: checksum mismatch (on rank 1)"
