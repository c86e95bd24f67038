"""The training loop in this process (one CPU rank, gloo): exact resume, NaN handling, init from
a model folder with the freeze policy, a donor transfer, the export, and the launcher's errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from megaxatl.config import config_from_dict
from megaxatl.train import TrainingDiverged, run
from test_train_common import (PRETRAIN, REPO, checkpoint_weights, clean_env, events, losses, make_init_dir,
                               signal_after_two_steps, tiny_config, train_shards)  # noqa: F401 (fixture)


def cfg_of(data):
    return config_from_dict(data)


def test_stop_and_resume_reproduces_the_uninterrupted_losses(tmp_path, train_shards):
    full = run(cfg_of(tiny_config(tmp_path / "full", train_shards)))
    assert full.completed and full.step == 8 and full.skipped == 0
    a = losses(tmp_path / "full")
    assert a[8] < a[1] - 0.3, a  # it learns
    assert full.val is not None and math.isfinite(full.val["val_bpb"]) and full.val["val_bpb"] > 0

    cfg = cfg_of(tiny_config(tmp_path / "split", train_shards, train__save_interval=100))
    first = run(cfg, stop_after=3)
    assert not first.completed and first.step == 3 and first.checkpoint.name == "step_00000003"
    second = run(cfg)
    assert second.resumed_from == 3 and second.completed
    b = losses(tmp_path / "split")
    assert b == a, "resumed run's losses differ from the uninterrupted run's"
    assert [e["event"] for e in events(tmp_path / "split")].count("resume") == 1
    # the exports of both runs hold the same weights, bit for bit
    from megaxatl.checkpoint import load_model_dir

    wa, meta = load_model_dir(tmp_path / "full" / "final")
    wb, _ = load_model_dir(tmp_path / "split" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert meta["step"] == 8 and meta["config"]["train"]["steps"] == 8


def test_nan_loss_is_skipped_and_counted(tmp_path, train_shards):
    fired = set()

    def once_at_step_3(step, micro):
        if step == 3 and step not in fired:
            fired.add(step)
            return True
        return False

    res = run(cfg_of(tiny_config(tmp_path / "r", train_shards, train__steps=5, train__grad_accum=2)), fault=once_at_step_3)
    assert res.completed and res.step == 5 and res.skipped == 1
    assert all(math.isfinite(v) for v in res.losses.values())
    skips = [e for e in events(tmp_path / "r") if e["event"] == "skip"]
    assert len(skips) == 1 and skips[0]["step"] == 2


def test_consecutive_nan_losses_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, train_shards):
    out = tmp_path / "r"
    cfg = cfg_of(tiny_config(out, train_shards, train__save_interval=2, train__max_bad_steps=3))
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses in a row at step 6.*step_00000004"):
        run(cfg, fault=lambda step, micro: step >= 6)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000002", "step_00000004"]
    assert not any(p.name.startswith(".tmp") for p in ckpts.iterdir())
    assert events(out)[-1]["event"] == "diverged"
    # a restart (the cause fixed) resumes from that checkpoint
    res = run(cfg)
    assert res.resumed_from == 4 and res.completed


def test_init_from_folder_freezes_transferred_weights_until_the_fixed_step(tmp_path, train_shards):
    data = tiny_config(tmp_path / "run", train_shards, parallel__zero_stage=2, train__save_interval=1,
                       train__keep_last=20, transfer__freeze={"policy": "fixed", "unfreeze_step": 3, "warmup_steps": 2})
    init, transferred = make_init_dir(data, tmp_path / "init")
    data["train"]["init_from"] = str(tmp_path / "init")
    res = run(cfg_of(data))
    assert res.completed and res.unfrozen_at == 3
    fresh = [n for n in init if n not in transferred]
    for step in range(1, 6):
        w = checkpoint_weights(tmp_path / "run" / "checkpoints" / f"step_{step:08d}")
        frozen_same = [torch.equal(w[n], init[n]) for n in transferred]
        assert all(frozen_same) == (step <= 3) and (any(frozen_same) is (step <= 3)), step
        assert not any(torch.equal(w[n], init[n]) for n in fresh if "A_log" not in n and n.endswith("weight")), step
    lr = {r["step"]: r["lr_transferred"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
          if r["kind"] == "train"}
    assert lr[1] == lr[3] == 0.0 and lr[4] > 0 and lr[5] > lr[4]
    meta = json.loads((tmp_path / "run" / "final" / "meta.json").read_text())
    assert sorted(meta["transferred"]) == sorted(transferred) and meta["report"] == {"donor": "test"}


def test_training_from_a_donor_transfers_then_unfreezes(tmp_path, train_shards):
    pytest.importorskip("transformers")
    from fixtures_donors import make_tiny_donor
    from megaxatl.donors import open_donor
    from megaxatl.transfer import model_dict_from_donor

    # the donor's vocabulary must cover the shards' 300-piece tokenizer (no tokenizer/ to check ids)
    _, donor = make_tiny_donor("gpt_neox", tmp_path / "neox", vocab_size=300)
    spec = open_donor(donor).spec
    model = model_dict_from_donor(spec, "*M", mamba={"d_state": 8})
    data = tiny_config(tmp_path / "run", train_shards, train__steps=4, transfer__donor=str(donor),
                       transfer__freeze={"policy": "lit", "window": 1, "threshold": 1.0, "patience": 1, "warmup_steps": 1})
    data["model"] = model
    res = run(cfg_of(data))
    assert res.completed
    # LIT with threshold 1.0: the second window's improvement (< 100 %) unfreezes at step 2
    assert res.unfrozen_at == 2 and [e["step"] for e in events(tmp_path / "run") if e["event"] == "unfreeze"] == [2]
    meta = json.loads((tmp_path / "run" / "final" / "meta.json").read_text())
    assert meta["transferred"] and meta["trained_from"] == f"donor:{donor}"


def test_launcher_reports_config_errors_in_one_line(tmp_path, train_shards):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(tiny_config(tmp_path / "run", train_shards)))
    proc = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(cfg), "--set", "train.stepz=3"],
                          env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("pretrain: config error:")
    assert "c.json" in proc.stderr and "train.stepz" in proc.stderr
    no_data = tiny_config(tmp_path / "run", train_shards)
    no_data["data"]["train_shards"] = None
    cfg.write_text(json.dumps(no_data))
    proc = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(cfg)],
                          env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.train_shards" in proc.stderr.strip().splitlines()[-1]


def test_wandb_offline_and_mfu_from_a_configured_peak(tmp_path, train_shards, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MEGAXATL_PEAK_TFLOPS", "0.5")
    out = tmp_path / "r"
    res = run(cfg_of(tiny_config(out, train_shards, train__steps=2)))
    assert res.completed
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run written"
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if r["kind"] == "train"]
    assert all(r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.5) for r in train)
    assert all(r["tokens_per_s"] > 0 and r["eta_s"] >= 0 for r in train)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, train_shards):
    import signal

    out = tmp_path / "r"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(tiny_config(out, train_shards, train__steps=100000, train__save_interval=100000)))
    proc = subprocess.Popen([sys.executable, str(PRETRAIN), "--config", str(cfg)], env=clean_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = signal_after_two_steps(proc, out, signal.SIGTERM)
    assert "rerun to resume" in err and events(out)[-1]["event"] == "stop"


def test_non_finite_gradient_under_a_finite_loss_skips_the_update(tmp_path, train_shards):
    # one micro-batch of step 3 gets an infinite gradient while its loss stays finite
    cfg = cfg_of(tiny_config(tmp_path / "r", train_shards, train__steps=5, train__save_interval=1, train__keep_last=9,
                             train__max_bad_steps=2))
    res = run(cfg, fault=lambda step, micro: "grad" if step == 3 else False)
    assert res.completed and res.skipped == 1 and 3 not in res.losses
    skips = [e for e in events(tmp_path / "r") if e["event"] == "skip"]
    assert len(skips) == 1 and skips[0]["reason"].startswith("non-finite gradient (loss ")
    # the skipped update changed nothing: step 3's weights are step 2's
    w2, w3 = (checkpoint_weights(tmp_path / "r" / "checkpoints" / f"step_{s:08d}") for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    with pytest.raises(TrainingDiverged, match=r"2 non-finite gradients in a row at step 5"):
        run(cfg_of(tiny_config(tmp_path / "s", train_shards, train__steps=6, train__max_bad_steps=2)),
            fault=lambda step, micro: "grad" if step >= 4 else False)


def _twins_clipped_by_torch(clip: float = 0.5):
    """Two equal Linear layers after the same backward; the second's gradients clipped by torch
    and its AdamW ready to step. -> (a, x, b, b's optimizer, the norm torch measured)."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 8)
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(b.parameters(), clip))
    return a, x, b, torch.optim.AdamW(b.parameters(), lr=0.1), ref_norm


def test_step_guard_clips_like_torch_and_skips_non_finite():
    from megaxatl.train.guard import StepGuard

    a, x, b, opt_b, ref_norm = _twins_clipped_by_torch()
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1)
    guard = StepGuard(opt_a, clip=0.5)
    opt_a.step()
    opt_b.step()
    assert abs(guard.last_norm - ref_norm) <= 1e-6 * ref_norm and not guard.last_skipped
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(a.parameters(), b.parameters()))
    before = [p.detach().clone() for p in a.parameters()]
    moments = [opt_a.state[p]["exp_avg"].clone() for p in a.parameters()]
    opt_a.zero_grad()
    a(x).sum().backward()
    a.weight.grad[0, 0] = float("inf")
    opt_a.step()
    assert guard.last_skipped and guard.skipped == 1 and opt_a.overflow
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert all(torch.equal(opt_a.state[p]["exp_avg"], m) for p, m in zip(a.parameters(), moments))


def test_step_guard_decides_a_zero_step_once_for_all_groups():
    """DeepSpeed's ZeRO-1/2 step calls AdamW once per param group; the guard decides at the start
    of the ZeRO step, over every group: clipping uses the global norm, and a non-finite gradient
    in one group skips the update of all of them."""
    from megaxatl.train.gradnorm import NormPlan
    from megaxatl.train.guard import StepGuard

    class ZeroLike:  # the shape of DeepSpeed's ZeRO step: one group in param_groups at a time
        def __init__(self, opt):
            self.optimizer = opt

        def step(self):
            groups = self.optimizer.param_groups
            for g in list(groups):
                self.optimizer.param_groups = [g]
                self.optimizer.step()
            self.optimizer.param_groups = groups

    a, x, b, opt_b, ref_norm = _twins_clipped_by_torch()
    opt_a = torch.optim.AdamW([{"params": [a.weight]}, {"params": [a.bias]}], lr=0.1)
    guard, zero = StepGuard(opt_a, clip=0.5), ZeroLike(opt_a)
    guard.attach(NormPlan([((lambda p=p: p.grad), [(0, p.numel())]) for p in a.parameters()], 1,
                          before_zero_step=True), zero)
    guard.begin_step()
    zero.step()
    opt_b.step()
    assert abs(guard.last_norm - ref_norm) <= 1e-6 * ref_norm and ref_norm > 0.5
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(a.parameters(), b.parameters()))
    before = [p.detach().clone() for p in a.parameters()]
    opt_a.zero_grad()
    a(x).sum().backward()
    a.bias.grad[0] = float("nan")  # the second group only
    guard.begin_step()
    zero.step()
    assert guard.last_skipped and guard.skipped == 1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
