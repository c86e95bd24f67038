"""`megaxatl plan` and the layout helper: the model-state formulas against what DeepSpeed really
holds on 2 CPU ranks (gloo, torch AdamW), the TP / PP parameter split, the CLI's table and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megaxatl.cli import main as cli_main
from megaxatl.cluster import layout
from megaxatl.cluster.plan import GiB, activation_bytes, layer_activation_bytes, model_state_bytes, plan, rank_params
from megaxatl.config import config_from_dict, load_config
from megaxatl.models import count_parameters
from test_train_common import BIN, REPO, clean_env, free_port

SMALL = {"model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "pattern": "*M", "d_mlp": 128, "n_heads": 2,
                   "max_seq_len": 64, "mamba": {"d_state": 8}},
         "data": {"seq_len": 16, "micro_batch_size": 2}}


CASES = [("fp32", 0), ("fp32", 2), ("bf16", 2)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One 2-rank torchrun measuring every case (one start-up instead of three)."""
    root = tmp_path_factory.mktemp("plan_measure")
    paths = []
    for dtype, zero in CASES:
        data = json.loads(json.dumps(SMALL))
        data["parallel"] = {"zero_stage": zero}
        data["train"] = {"dtype": dtype}
        paths.append(root / f"{dtype}-zero{zero}.json")
        paths[-1].write_text(json.dumps(data))
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           str(REPO / "tests" / "plan_measure_worker.py"), str(root / "out"), *map(str, paths)],
                          env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.mark.parametrize("dtype, zero", CASES)
def test_predicted_model_state_memory_matches_deepspeed_on_two_ranks(measured, dtype, zero):
    cfg = load_config(measured / f"{dtype}-zero{zero}.json")
    psi = rank_params(cfg.model, 1, 1)
    assert psi == count_parameters(cfg.model)
    w, g, o = model_state_bytes(psi, dtype, zero, dp=2)
    for rank in (0, 1):
        got = json.loads((measured / "out" / f"{dtype}-zero{zero}-rank{rank}.json").read_text())
        measured_total = got["params"] + got["grads"] + got["optim"]
        assert abs(w + g + o - measured_total) <= 0.15 * measured_total, (rank, (w, g, o), got)
        assert got["params"] == pytest.approx(w, rel=0.01)  # the compute weights are exact


def test_zero_formulas_follow_the_zero_paper():
    psi, d = 1e9, 8
    tot = {z: sum(model_state_bytes(psi, "bf16", z, d)) / psi for z in range(4)}
    assert tot == pytest.approx({0: 16, 1: 4 + 12 / d, 2: 2 + 14 / d, 3: 16 / d})
    assert sum(model_state_bytes(psi, "fp32", 0, d)) / psi == pytest.approx(16)  # no master copy


def test_tp_and_pp_split_the_parameters():
    cfg = load_config(REPO / "configs" / "mamba_2.8b.json")
    n = count_parameters(cfg.model)
    assert rank_params(cfg.model, 1, 1) == n
    # everything but the replicated norms and row-parallel output biases is split
    assert n / 2 < rank_params(cfg.model, 2, 1) < n / 2 * 1.01
    assert n / 4 < rank_params(cfg.model, 1, 4) < n / 4 + cfg.model.padded_vocab_size * cfg.model.d_model
    tied = config_from_dict({**SMALL, "model": {**SMALL["model"], "tie_embeddings": True}})
    emb = tied.model.padded_vocab_size * tied.model.d_model
    # with PP the last stage holds its own copy of a tied embedding
    assert rank_params(tied.model, 1, 2) - rank_params(tied.model, 1, 1) // 2 > emb // 2


def test_activations_shrink_with_checkpointing_tp_and_grow_with_the_scan_chunks():
    cfg = load_config(REPO / "configs" / "mamba_2.8b.json")
    full = activation_bytes(cfg, 1, 1, 8, 2048, False, 1)
    assert activation_bytes(cfg, 1, 1, 8, 2048, True, 1) < full / 4  # the logits stay
    # TP halves the mixer / MLP channels; the h-sized norm tensors (a quarter here) stay whole
    assert 0.5 * full < activation_bytes(cfg, 2, 1, 8, 2048, False, 1) < 0.65 * full
    m = cfg.model
    one, two = (layer_activation_bytes(m, "M", 1, s, 2, 1) for s in (2048, 2049))
    e = int(m.mamba.expand * m.d_model)
    # one step past 2048 starts a second chunk of saved scan states (fp32, 2N per channel)
    assert two - one * 2049 / 2048 == pytest.approx(4 * e * 2 * m.mamba.d_state, rel=0.01)
    assert layer_activation_bytes(m, "*", 1, 2048, 2, 1) != one


def test_plan_lists_fitting_layouts_fastest_first():
    cfg = load_config(REPO / "configs" / "mamba_2.8b.json")
    fits, rows = plan(cfg, gpus=16, gpu_mem_gb=40)
    assert fits and len(fits) < len(rows)
    assert all(r.total <= 40 * GiB for r in fits)
    assert [r.step_s for r in fits] == sorted(r.step_s for r in fits)
    assert {(r.tp, r.pp, r.dp) for r in rows} >= {(1, 1, 16), (2, 1, 8), (8, 1, 2), (1, 2, 8), (2, 8, 1)}
    assert all(r.tp * r.pp * r.dp == 16 and r.tp <= 8 for r in rows)
    assert not any(r.pp > 1 and r.zero > 1 for r in rows)
    # the pipeline bubble costs time; checkpointing costs a third more FLOPs
    base = next(r for r in rows if (r.tp, r.pp, r.zero, r.ckpt) == (1, 1, 1, False))
    ck = next(r for r in rows if (r.tp, r.pp, r.zero, r.ckpt) == (1, 1, 1, True))
    assert ck.step_s - ck.comm_s == pytest.approx((base.step_s - base.comm_s) * 4 / 3) and ck.comm_s == base.comm_s
    assert next(r for r in rows if (r.tp, r.pp, r.zero, r.ckpt) == (1, 2, 1, False)).step_s > base.step_s


def test_plan_cli(capsys):
    rc = cli_main(["plan", "--config", str(REPO / "configs" / "mamba_2.8b.json"), "--gpus", "16", "--gpu-mem", "80",
                   "--seq-len", "1024", "--micro-batch", "4", "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert "seq 1024 x micro-batch 4" in lines[0] and lines[1].startswith("assumed: MFU")
    assert lines[2].startswith("activations: 'cuda' kernels") and "not measured" in lines[2]
    assert "decode state per sequence" in lines[3]
    assert lines[5].split()[:5] == ["TP", "PP", "DP", "ZeRO", "ckpt"] and len(lines) == 9
    assert "comm s" in lines[5]
    assert cli_main(["plan", "--config", str(REPO / "configs" / "mamba_2.8b.json"), "--gpus", "16", "--gpu-mem", "80",
                     "--kernels", "torch", "--top", "1"]) == 0
    assert "'torch' kernels, measured-calibrated" in capsys.readouterr().out
    assert cli_main(["plan", "--config", str(REPO / "configs" / "mamba_2.8b.json"), "--gpus", "1",
                     "--gpu-mem", "8"]) == 1
    assert "nothing fits in 8 GiB" in capsys.readouterr().out
    assert cli_main(["plan", "--config", "nope.json", "--gpus", "2", "--gpu-mem", "8"]) == 2
    assert "megaxatl plan: error:" in capsys.readouterr().err


def test_layout_helper_cli():
    run = lambda *a: subprocess.run([sys.executable, "-m", "megaxatl.cluster.layout", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, env=clean_env())
    ok = run("--config", "configs/mamba_2.8b.json", "--nodes", "3", "--gpus-per-node", "8", "--shell")
    assert ok.returncode == 0 and ok.stdout.strip() == "TP=2 PP=1 DP=12 WORLD_SIZE=24"
    bad = run("--config", "configs/mamba_2.8b.json", "--nodes", "2", "--gpus-per-node", "8", "--pp", "3")
    assert bad.returncode == 2 and "pp 3 does not divide n_layers 32" in bad.stderr
    cfg = load_config(REPO / "configs" / "tiny_hybrid.json")  # 4 heads, padded vocab 304, Mamba-2 8 heads
    assert layout.valid_tp(cfg.model, 16) == [1, 2, 4]
    assert "does not divide" in layout.tp_problem(cfg.model, 8)
    assert layout.valid_pp(cfg.model, 8) == [1, 2, 4]


def test_step_time_models_tp_pp_and_dp_communication_from_the_stated_bandwidths():
    """Communication from ring-collective volumes over the stated links: TP all-reduces 4 times per
    block (mixer and MLP, forward and backward) plus the embedding and head, DP reduces the rank's
    gradients once per step, and a slower inter-node link slows exactly the layouts that cross it."""
    from megaxatl.cluster import comm_model as cm

    cfg = load_config(REPO / "configs" / "mamba_2.8b.json")
    b, s = cfg.data.micro_batch_size, cfg.data.seq_len
    fits, rows = plan(cfg, gpus=16, gpu_mem_gb=80)
    row = {(r.tp, r.pp, r.zero, r.ckpt): r for r in rows}
    tp2, tp1 = row[(2, 1, 1, False)], row[(1, 1, 1, False)]
    # by hand: TP 2 inside a node, 32 blocks x 4 + 2 all-reduces of (s, b, h) bf16 per micro-batch
    m = b * cfg.train.grad_accum * 16 // (b * 8)
    by_hand_tp = m * (32 * 4 + 2) * (2 * 1 / 2) * s * b * 2560 * 2 / (cm.NVLINK_GBS * 1e9)
    by_hand_dp = 2 * 7 / 8 * tp2.params * 2 / (cm.IB_GBS * 1e9)  # 8 DP ranks over 2 nodes
    assert tp2.comm_s == pytest.approx(by_hand_tp + by_hand_dp, rel=1e-9)
    assert tp2.step_s != tp1.step_s  # the layout now changes the step time
    # ZeRO 3 gathers the weights twice: 1.5x the DP volume of ZeRO 2
    z2, z3 = row[(1, 1, 2, False)], row[(1, 1, 3, False)]
    assert z3.comm_s == pytest.approx(1.5 * z2.comm_s)
    # a 10x faster inter-node link: the DP time (16 GPUs span 2 nodes) drops 10x; TP's does not
    _, fast = plan(cfg, gpus=16, gpu_mem_gb=80, inter_gbs=cm.IB_GBS * 10)
    f = {(r.tp, r.pp, r.zero, r.ckpt): r for r in fast}
    assert f[(2, 1, 1, False)].comm_s == pytest.approx(by_hand_tp + by_hand_dp / 10, rel=1e-9)
    # one node: no inter-node link at all
    _, one = plan(cfg, gpus=8, gpu_mem_gb=80, inter_gbs=1e-3)
    assert all(r.comm_s < 1.0 for r in one)
