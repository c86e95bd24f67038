"""Distillation (megaxatl/train/distill.py): the loss and its gradient against a direct computation,
hidden-state alignment touching only the replaced mixers, exact resume across both stages, and
the layouts alignment refuses (tensor / pipeline parallel runs: test_train_distill_parallel.py)."""

from __future__ import annotations

import math

import pytest
import torch

from megaxatl.config import ConfigError, config_from_dict
from megaxatl.train import run
from megaxatl.train.distill import align_loss, kl_loss, mixed_loss
from test_train_common import checkpoint_weights, losses, tiny_config, train_shards  # noqa: F401 (fixture)


def _direct_mixed(s, t, labels, w, temp):
    """Float64, token by token: (1 - w) CE + w T^2 sum_v p_t (log p_t - log p_s)."""
    s, t = s.double().flatten(0, 1), t.double().flatten(0, 1)
    ce, kl, n = 0.0, 0.0, 0
    for i, y in enumerate(labels.flatten().tolist()):
        if y == -100:
            continue
        n += 1
        ce = ce - (s[i][y] - torch.logsumexp(s[i], 0))
        ps = torch.exp(s[i] / temp - torch.logsumexp(s[i] / temp, 0))
        pt = torch.exp(t[i] / temp - torch.logsumexp(t[i] / temp, 0))
        kl = kl + (pt * (pt.log() - ps.log())).sum()
    return (1 - w) * ce / n + w * temp * temp * kl / n


@pytest.mark.parametrize("temp,w", [(1.0, 0.5), (2.0, 0.8), (0.7, 1.0)])
def test_mixed_loss_and_gradient_match_a_direct_computation(temp, w):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 5, 11, generator=g) * 3
    t = torch.randn(2, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    s1 = s.clone().requires_grad_(True)
    ours = mixed_loss(s1, labels, t, w, temp)
    ours.backward()
    s2 = s.double().clone().requires_grad_(True)
    ref = _direct_mixed(s2, t, labels, w, temp)
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    assert torch.allclose(s1.grad.double(), s2.grad, atol=1e-6)
    # the KL term's gradient in closed form: T (p_s - p_t) / n at counted tokens, 0 elsewhere
    s3 = s.clone().requires_grad_(True)
    mask = labels != -100
    kl_loss(s3, t, temp, mask).backward()
    expect = temp * (torch.softmax(s / temp, -1) - torch.softmax(t / temp, -1)) / mask.sum()
    assert torch.allclose(s3.grad, expect * mask[..., None], atol=1e-6)
    assert kl_loss(t, t, temp).abs().item() < 1e-6  # KL(p || p) = 0


def test_align_loss_is_relative_squared_error_averaged_over_layers():
    g = torch.Generator().manual_seed(2)
    t = [torch.randn(2, 3, 4, generator=g), 5 * torch.randn(2, 3, 4, generator=g)]
    s = [x + 0.1 * torch.randn(x.shape, generator=g) for x in t]
    ref = sum(((a - b) ** 2).sum() / (b ** 2).sum() for a, b in zip(s, t)) / 2
    assert abs(align_loss(s, t).item() - ref.item()) < 1e-6


def make_teacher(tmp_path_factory, **model_over):
    """An all-attention 2-layer model folder with the shards' 300-token vocabulary (model_over:
    dotted model keys with '__', e.g. model__pad_vocab_multiple=8)."""
    from megaxatl.checkpoint import save_model_dir
    from megaxatl.config import config_to_dict
    from megaxatl.models import build

    data = tiny_config(tmp_path_factory.mktemp("unused"), "x", **model_over)
    data["model"]["pattern"] = "**"
    cfg = config_from_dict({"model": data["model"]})
    torch.manual_seed(5)
    model = build(cfg)
    path = tmp_path_factory.mktemp("teacher") / "t"
    save_model_dir(path, model.state_dict(), {"config": config_to_dict(cfg), "step": 0})
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory)


def _distill_cfg(out, shards, teacher, **over):
    return tiny_config(out, shards, train__distill={"teacher": str(teacher), "weight": 0.7, "weight_end": 0.2,
                                                    "temperature": 2.0, "align_steps": 3}, **over)


def test_distillation_resumes_exactly_across_both_stages(tmp_path, train_shards, teacher):
    full = run(config_from_dict(_distill_cfg(tmp_path / "full", train_shards, teacher)))
    assert full.completed
    a = losses(tmp_path / "full")
    plain = losses(run(config_from_dict(tiny_config(tmp_path / "plain", train_shards))).out_dir)
    assert all(math.isfinite(v) for v in a.values()) and a[4] != plain[4] and a[1] != plain[1]

    cfg = config_from_dict(_distill_cfg(tmp_path / "split", train_shards, teacher, train__save_interval=100))
    assert run(cfg, stop_after=2).step == 2  # inside stage 1
    assert run(cfg, stop_after=5).step == 5  # resumed in stage 1, stopped in stage 2
    assert run(cfg).completed
    assert losses(tmp_path / "split") == a, "losses after resumes differ from the uninterrupted run's"
    from megaxatl.checkpoint import load_model_dir

    wa, _ = load_model_dir(tmp_path / "full" / "final")
    wb, _ = load_model_dir(tmp_path / "split" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_alignment_stage_trains_only_the_replaced_mixers(tmp_path, train_shards, teacher):
    data = _distill_cfg(tmp_path / "r", train_shards, teacher, train__steps=2, train__save_interval=1,
                        train__warmup_steps=0, train__weight_decay=0.0)  # decay moves every weight, gradient or not
    res = run(config_from_dict(data))
    w0 = checkpoint_weights(tmp_path / "r" / "checkpoints" / "step_00000001")
    w1 = checkpoint_weights(res.checkpoint)
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed and all(k.startswith("layers.1.mixer.") for k in changed), sorted(changed)


def test_distillation_refuses_layouts_it_does_not_cover(tmp_path, train_shards, teacher):
    from megaxatl.config import load_config
    import json

    for over, what in (({"parallel__tp": 2}, "tp = 1, pp = 1"), ({"parallel__pp": 2}, "tp = 1, pp = 1"),
                       ({"parallel__zero_stage": 3}, "ZeRO stage 3")):
        p = tmp_path / "c.json"
        p.write_text(json.dumps(_distill_cfg(tmp_path / "x", train_shards, teacher, **over)))
        with pytest.raises(ConfigError, match="train.distill.align_steps.*" + what):
            load_config(p)
    # logit distillation itself runs at tp / pp > 1 (tests/test_train_distill_parallel.py)
    p.write_text(json.dumps(_distill_cfg(tmp_path / "x", train_shards, teacher, parallel__tp=2,
                                         train__distill__align_steps=0)))
    assert load_config(p).parallel.tp == 2
    bad = tiny_config(tmp_path / "v", train_shards, train__distill={"teacher": str(teacher)},
                      model__vocab_size=320)
    with pytest.raises(ValueError, match="vocabulary"):
        run(config_from_dict(bad))
