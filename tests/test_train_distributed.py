"""Two CPU ranks (gloo) launched like a real job: ZeRO-3 with torchrun (stop + resume reproduces
the uninterrupted run exactly) and ZeRO-2 in bf16 with the `deepspeed` launcher; both start from a
model folder whose transferred weights must stay bit-identical until the unfreeze step."""

from __future__ import annotations

import torch

from megaxatl.checkpoint import load_model, load_model_dir
from megaxatl.config import config_from_dict
from megaxatl.train import run
from test_train_common import (assert_ok, checkpoint_weights, continue_in, launch, losses, make_init_dir,
                               tiny_config, train_shards, write_config)  # noqa: F401 (fixture)


def freeze_config(out, shards, **over):
    return tiny_config(out, shards, train__save_interval=1, train__keep_last=20,
                       transfer__freeze={"policy": "fixed", "unfreeze_step": 3, "warmup_steps": 2}, **over)


def check_frozen_then_moving(run_dir, init, transferred, cast=lambda t: t):
    fresh = [n for n in init if n not in transferred and n.endswith("weight") and "A_log" not in n]
    for step in (1, 3, 4):
        w = checkpoint_weights(run_dir / "checkpoints" / f"step_{step:08d}")
        same = [torch.equal(w[n], cast(init[n])) for n in transferred]
        if step <= 3:
            assert all(same), f"step {step}: frozen weights changed: {[n for n, s in zip(transferred, same) if not s]}"
        else:
            assert not any(same), f"step {step}: unfrozen weights did not move"
        assert not any(torch.equal(w[n], cast(init[n])) for n in fresh), f"step {step}: fresh weights did not train"


def test_zero3_two_ranks_learns_freezes_and_resumes_exactly(tmp_path, train_shards):
    data = freeze_config(tmp_path / "full", train_shards, parallel__zero_stage=3)
    init, transferred = make_init_dir(data, tmp_path / "init")
    data["train"]["init_from"] = str(tmp_path / "init")
    assert_ok(launch(write_config(tmp_path / "full.json", data), nproc=2))
    a = losses(tmp_path / "full")
    assert sorted(a) == list(range(1, 9)) and a[8] < a[1] - 0.3, a
    check_frozen_then_moving(tmp_path / "full", init, transferred)
    model, cfg, meta = load_model(tmp_path / "full" / "final")  # the consolidated export loads strictly
    assert meta["step"] == 8 and cfg.parallel.zero_stage == 3

    data["train"]["out_dir"] = str(tmp_path / "split")
    split_cfg = write_config(tmp_path / "split.json", data)
    assert_ok(launch(split_cfg, nproc=2, extra=["--stop-after", "4"]))
    assert sorted(losses(tmp_path / "split")) == [1, 2, 3, 4]
    # the same checkpoint resumed by one process without ZeRO (2 x 4 samples per step in one
    # micro-batch of 8): ZeRO-3's gathered weights and moments carry on to the same losses
    one = continue_in(tmp_path / "split", tmp_path / "one", data)
    one["data"]["micro_batch_size"] = 2 * data["data"]["micro_batch_size"]
    proc = launch(split_cfg, nproc=2)
    assert_ok(proc)
    b = losses(tmp_path / "split")
    assert b == a, f"resumed losses differ:\n{a}\n{b}"
    wa, _ = load_model_dir(tmp_path / "full" / "final")
    wb, _ = load_model_dir(tmp_path / "split" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    run(config_from_dict(one))
    c = losses(tmp_path / "one")
    assert all(abs(c[s] - a[s]) <= 1e-5 * a[s] for s in range(5, 9)), (a, c)


def test_zero2_bf16_two_ranks_with_the_deepspeed_launcher(tmp_path, train_shards):
    data = freeze_config(tmp_path / "run", train_shards, parallel__zero_stage=2, train__dtype="bf16", train__steps=6)
    init, transferred = make_init_dir(data, tmp_path / "init")
    data["train"]["init_from"] = str(tmp_path / "init")
    assert_ok(launch(write_config(tmp_path / "c.json", data), nproc=2, launcher="deepspeed"))
    a = losses(tmp_path / "run")
    assert sorted(a) == list(range(1, 7)) and a[6] < a[1] - 0.2, a
    # DeepSpeed's fp32 master weights start from the bf16 copy of the initial weights
    check_frozen_then_moving(tmp_path / "run", init, transferred, cast=lambda t: t.bfloat16().float())
