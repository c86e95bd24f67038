"""XATL freeze machinery without DeepSpeed: the LIT rule, the fixed policy, resume of the policy,
the unfreeze LR warmup, and the gradient gate keeping frozen weights bit-identical."""

from __future__ import annotations

import pytest
import torch

from megaxatl.config import FreezeConfig, TrainConfig
from megaxatl.train.freeze import FreezePolicy, GradGate
from megaxatl.train.schedule import GroupLRScheduler, base_lr

# windows of 3 steps; window means 10, 8, 7.8, 7, 6.9, 6.85, 6.0
# relative improvements:   .2, .025, .1026, .0143, .0072, .124
SCRIPT = [10.0] * 3 + [8.0] * 3 + [7.8] * 3 + [7.0] * 3 + [6.9] * 3 + [6.85] * 3 + [6.0] * 3


def unfreeze_step(policy: FreezePolicy, losses, start: int = 1):
    fired = [step for step, loss in enumerate(losses, start) if policy.observe(step, loss)]
    assert len(fired) <= 1, f"unfroze more than once: {fired}"
    return fired[0] if fired else None


@pytest.mark.parametrize("patience,threshold,expected", [
    (2, 0.05, 18),   # below 0.05 at windows ending 9 (streak 1, reset at 12), 15, 18 -> 2 in a row at 18
    (1, 0.05, 9),    # the first window below the threshold
    (1, 0.01, 18),   # 0.0072 is the first improvement below 0.01
    (3, 0.05, None),  # never three in a row
    (1, 0.0, None),  # threshold 0: only a loss that gets worse counts
])
def test_lit_unfreezes_exactly_when_the_rule_says(patience, threshold, expected):
    p = FreezePolicy(FreezeConfig(policy="lit", window=3, threshold=threshold, patience=patience))
    assert p.frozen and p.lr_multiplier(1) == 0.0
    assert unfreeze_step(p, SCRIPT) == expected
    assert p.frozen == (expected is None)
    if expected is not None:
        assert p.unfrozen_at == expected
        # the history records every closed window with its relative improvement
        assert [h["step"] for h in p.history] == list(range(3, expected + 1, 3))
        assert p.history[1]["rel_improvement"] == pytest.approx(0.2)


def test_lit_counts_a_worse_window_as_no_improvement():
    p = FreezePolicy(FreezeConfig(policy="lit", window=2, threshold=0.01, patience=1))
    assert unfreeze_step(p, [5.0, 5.0, 5.2, 5.2]) == 4


def test_lit_state_resumes_mid_window():
    cfg = FreezeConfig(policy="lit", window=3, threshold=0.05, patience=2)
    a = FreezePolicy(cfg)
    assert unfreeze_step(a, SCRIPT[:14]) is None  # stop inside the window 13-15, streak 0 after 12
    b = FreezePolicy(cfg)
    b.load_state_dict(a.state_dict())
    assert unfreeze_step(b, SCRIPT[14:], start=15) == 18


def test_fixed_and_none_policies():
    p = FreezePolicy(FreezeConfig(policy="fixed", unfreeze_step=5, warmup_steps=4))
    assert [p.observe(s, 1.0) for s in range(1, 5)] == [False] * 4 and p.lr_multiplier(5) == 0.0
    assert p.observe(5, 1.0) and not p.frozen
    assert [p.lr_multiplier(s) for s in (6, 7, 9, 20)] == [0.25, 0.5, 1.0, 1.0]
    assert unfreeze_step(p, [1.0] * 5, start=6) is None
    p0 = FreezePolicy(FreezeConfig(policy="fixed", unfreeze_step=0))
    assert not p0.frozen and p0.lr_multiplier(1) == 1.0 and unfreeze_step(p0, [1.0] * 3) is None
    pn = FreezePolicy(FreezeConfig(policy="none"))
    assert not pn.frozen and pn.lr_multiplier(1) == 1.0 and unfreeze_step(pn, [1.0] * 3) is None


class _FakeOptimizer:
    def __init__(self, roles):
        self.param_groups = [{"role": r, "lr": None} for r in roles]


def test_unfreeze_warmup_lr_curve():
    """Transferred groups: LR 0 while frozen, then (s - u) / W of the main schedule, then the main one."""
    tcfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    policy = FreezePolicy(FreezeConfig(policy="fixed", unfreeze_step=20, warmup_steps=5))
    opt = _FakeOptimizer(["fresh/decay", "fresh/no_decay", "transferred/decay", "transferred/no_decay"])
    sched = GroupLRScheduler(opt, tcfg, policy)
    for s in range(1, 41):  # LRs in force for optimizer step s, then the trainer's order of calls
        lrs = [g["lr"] for g in opt.param_groups]
        base = base_lr(s, tcfg)
        assert lrs[0] == lrs[1] == pytest.approx(base)
        expected = 0.0 if s <= 20 else base * min(1.0, (s - 20) / 5)
        assert lrs[2] == lrs[3] == pytest.approx(expected), s
        sched.step()  # DeepSpeed, after the optimizer step
        if policy.observe(s, 1.0):
            sched.apply()
    # main schedule: linear warmup, cosine to min_lr at `steps`
    assert base_lr(5, tcfg) == pytest.approx(0.5)
    assert base_lr(10, tcfg) == pytest.approx(1.0)
    assert base_lr(55, tcfg) == pytest.approx(0.55)
    assert base_lr(100, tcfg) == pytest.approx(0.1) and base_lr(150, tcfg) == pytest.approx(0.1)


def test_scheduler_state_roundtrip_reapplies_lrs():
    tcfg = TrainConfig(steps=50, lr=1.0, min_lr=0.0, warmup_steps=4)
    policy = FreezePolicy(FreezeConfig(policy="none"))
    opt = _FakeOptimizer(["fresh/decay"])
    sched = GroupLRScheduler(opt, tcfg, policy)
    for _ in range(7):
        sched.step()
    opt2 = _FakeOptimizer(["fresh/decay"])
    sched2 = GroupLRScheduler(opt2, tcfg, policy)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(base_lr(8, tcfg))


def test_grad_gate_keeps_frozen_weights_bit_identical_then_lets_them_move():
    """Zero grads + LR 0 under AdamW with weight decay: not one bit changes; after open, they train."""
    torch.manual_seed(0)
    frozen = torch.nn.Linear(8, 8)
    fresh = torch.nn.Linear(8, 1)
    groups = [{"params": list(frozen.parameters()), "role": "transferred/decay", "weight_decay": 0.1},
              {"params": list(fresh.parameters()), "role": "fresh/decay", "weight_decay": 0.1}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    policy = FreezePolicy(FreezeConfig(policy="fixed", unfreeze_step=3, warmup_steps=2))
    sched = GroupLRScheduler(opt, TrainConfig(steps=10, lr=1e-2, min_lr=1e-3, warmup_steps=0), policy)
    gate = GradGate(frozen.parameters())
    gate.close()
    before = [p.detach().clone() for p in frozen.parameters()]
    fresh_before = [p.detach().clone() for p in fresh.parameters()]
    for step in range(1, 6):
        x = torch.randn(16, 8)
        loss = fresh(torch.relu(frozen(x))).pow(2).mean()
        loss.backward()
        if gate.closed:
            assert all(float(p.grad.abs().max()) == 0.0 for p in frozen.parameters())
            # a NaN gradient cannot leak through the gate either
        opt.step()
        opt.zero_grad()
        sched.step()
        if policy.observe(step, float(loss.detach())):
            gate.open()
            sched.apply()
        same = all(torch.equal(a, b) for a, b in zip(before, frozen.parameters()))
        assert same == (step <= 3), f"step {step}: frozen weights {'changed' if not same else 'did not move'}"
        assert not any(torch.equal(a, b) for a, b in zip(fresh_before, fresh.parameters()))


def test_grad_gate_blocks_nan_gradients():
    w = torch.nn.Parameter(torch.ones(3))
    gate = GradGate([w])
    gate.close()
    (w * float("nan")).sum().backward()
    assert torch.equal(w.grad, torch.zeros(3))
    gate.open()
    w.grad = None
    (w * 2).sum().backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))
