"""The external GPU kernels' own argument checks (layout, strides, dtype, shape: causal-conv1d's
TORCH_CHECKs, mamba-ssm's, fla's asserts, reimplemented in each `cuda` backend's prepare_*) applied
on CPU in the dispatch layer (megaxatl.kernels.testing.cuda_contracts), for every mixer of every
shipped config at TP 1 / 2 / 4 / 8, so that an argument a kernel would reject fails here first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaxatl.kernels.contract import ContractError
from megaxatl.kernels.conv1d import cuda as conv_cuda
from megaxatl.kernels.testing import cuda_contracts
from megaxatl.models.mamba2 import Mamba2

HERE = Path(__file__).parent
# what each mixer's training forward must have had checked (Mamba-1 at TP 1 goes through the fused
# mamba_inner op, whose `torch` backend composes the conv and scan ops, each checked too)
OPS = {"M": {"causal_conv1d", "selective_scan"}, "S": {"causal_conv1d", "ssd_scan"}, "R": {"gla_scan"},
       "G": {"gla_scan"}}


def smollm2_mamba2() -> Mamba2:
    """mamba2_smollm2_135m_hybrid's mixer: in_proj rows 2 * 576 + 2 * 64 + 9 = 1289."""
    return Mamba2(576, d_state=64, expand=1.0, head_dim=64, n_groups=1, chunk_size=64)


def test_every_mixer_of_every_shipped_config_at_every_tp_passes_the_kernels_checks():
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(HERE / "check_cuda_contracts.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    failed = [row for row in rows if row["status"] == "fail"]
    assert not failed and r.returncode == 0, json.dumps(failed, indent=1) + r.stderr[-3000:]
    shipped = {p.name for p in (HERE.parent / "configs").glob("*.json")}
    by_config = {}
    for row in rows:
        by_config.setdefault(row["config"], {})[row["tp"]] = row
    assert shipped <= set(by_config) and "tiny_hybrid.json with G" in by_config
    for name, tps in by_config.items():
        assert set(tps) == {1, 2, 4, 8}, name
        assert tps[1]["status"] == "ok", (name, tps[1])  # every config runs at TP 1
        for tp, row in tps.items():
            if row["status"] != "ok":
                assert "divide" in row["note"] or "split" in row["note"], row
                continue
            assert row["checked"], (name, tp)
            for symbol, calls in row["checked"].items():
                assert OPS[symbol] <= set(calls), (name, tp, symbol, calls)
                if symbol == "M":  # fused at TP 1 only (x_proj / out_proj all-reduce under TP)
                    assert ("mamba_inner" in calls) == (tp == 1), (name, tp, calls)
    ran = [(row["config"], row["tp"]) for row in rows if row["status"] == "ok"]
    assert len(ran) >= 50, ran
    # the Mamba-2 in_proj row widths the channel-last stride check rejects, all run and checked
    odd = {row["in_proj_rows"]["S"] for row in rows if row["status"] == "ok" and "S" in row["in_proj_rows"]}
    assert {1289, 164, 98} <= odd, odd


def test_mamba2_conv_input_view_is_what_causal_conv1d_rejects_and_dispatch_hands_it_a_valid_layout():
    mixer = smollm2_mamba2()
    hidden = torch.randn(1, 16, 576)
    _, xbc, _ = mixer._split(mixer.in_proj(hidden))
    view = xbc.transpose(1, 2)  # what models/mamba2.py passes: channel-last, stride(2) = 1289
    assert view.stride() == (16 * 1289, 1, 1289)
    w = mixer.conv1d.weight.squeeze(1)
    with pytest.raises(ContractError, match="channel last layout requires strides .* multiples of 8"):
        conv_cuda.check_fwd(view, w, mixer.conv1d.bias, device_checks=False)
    x, _, _ = conv_cuda.prepare_causal_conv1d(view, w, mixer.conv1d.bias, "silu", device_checks=False)
    assert x.stride(2) == 1  # copied to channel-first, which the kernel takes
    ok = torch.randn(2, 16, 1024)[..., :512].transpose(1, 2)  # a channel-last view it accepts: no copy
    assert conv_cuda.prepare_causal_conv1d(ok, torch.randn(512, 4), device_checks=False)[0] is ok


def test_a_stride_bug_in_the_dispatch_layer_fails_on_cpu(monkeypatch):
    """Without the layout fix (the bug as first written) the Mamba-2 forward fails its CPU check."""
    monkeypatch.setattr(conv_cuda, "kernel_layout", lambda x: x)
    with cuda_contracts(), pytest.raises(ContractError, match="causal-conv1d: .*multiples of 8 .*1289"):
        smollm2_mamba2()(torch.randn(1, 16, 576))
    monkeypatch.undo()
    with cuda_contracts() as checked:
        smollm2_mamba2()(torch.randn(1, 16, 576))
    assert checked == {"causal_conv1d": 1, "ssd_scan": 1}


def test_contracts_check_dtypes_and_shapes():
    from megaxatl.kernels import causal_conv1d

    with cuda_contracts(), pytest.raises(ContractError, match="x dtype must be float32, float16 or bfloat16"):
        causal_conv1d(torch.randn(2, 8, 8, dtype=torch.float64), torch.randn(8, 4))
    with cuda_contracts(), pytest.raises(ContractError, match="width between 2 and 4"):
        causal_conv1d(torch.randn(2, 6, 8), torch.randn(6, 5))
