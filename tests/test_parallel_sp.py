"""Sequence parallelism: TP=2 with sequence_parallel=True (gloo processes, fp32) gives the TP=1
logits, loss and every parameter gradient, the same optimizer step (replicated copies stay
bit-identical across ranks), the same cached decoding (run without the split), and the pipeline's
LM head matches; a sequence length not divisible by tp fails with a clear error."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import decode_gap
from megaxatl.config import config_from_dict
from megaxatl.models import build
from megaxatl.parallel import unshard
from megaxatl.parallel.tp_rules import Replicate
from test_parallel_tp import CONFIGS, TOL, _free_port, _rel

pytestmark = pytest.mark.multiprocess

# Every mixer with every bias the config allows: GQA (2 KV heads split), Mamba-1 / Mamba-2 with
# projection and conv biases, LayerNorm (weight and bias), GELU MLP with biases, sequential residual,
# untied head. The TP tests' configs add MQA (a copied KV head), a Mamba-2 group spanning ranks,
# RMSNorm, SwiGLU, tied embeddings and the parallel residual.
SP_CONFIGS = {
    **CONFIGS,
    "all_biases": dict(pattern="*MSRG", n_kv_heads=2, norm="layernorm", mlp="gelu", mlp_bias=True, qkv_bias=True,
                       attn_out_bias=True, parallel_residual=False, tie_embeddings=False,
                       mamba={"d_state": 8, "expand": 2.0, "proj_bias": True, "conv_bias": True},
                       mamba2={"d_state": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8, "proj_bias": True,
                               "conv_bias": True}),
}
VOCAB, SEQ = 395, 20


def built(name: str, seed: int = 0):
    over = dict(SP_CONFIGS[name])
    pattern = over.pop("pattern")
    model = {"vocab_size": VOCAB, "pad_vocab_multiple": 8, "d_model": 32, "n_layers": len(pattern),
             "pattern": pattern, "d_mlp": 64, "n_heads": 4, "max_seq_len": 64, "rotary_pct": 0.5,
             "mamba": {"d_state": 8, "expand": 2.0}, "retention": {"chunk_size": 8}, "gla": {"chunk_size": 8}}
    model.update(over)
    torch.manual_seed(seed)
    lm = build(config_from_dict({"model": model}))
    with torch.no_grad():  # non-trivial values everywhere (norm weights, biases start at 1 / 0)
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return lm


def _gather_unshard(name, t, rule, world):
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return unshard(name, parts, rule)  # raises if replicated copies differ across ranks


def _worker(rank: int, world: int, port: int, name: str, out_path: str, checkpointing: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from megaxatl.parallel import apply_tensor_parallel
        from megaxatl.parallel.pipeline import _head

        model = built(name)
        ref = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        labels[0, :3] = -100

        ref_logits = ref(ids)
        ref_loss = ref.loss(ids, labels)
        ref_loss.backward()

        tp = apply_tensor_parallel(model, dist.group.WORLD, sequence_parallel=True)
        tp.gradient_checkpointing = checkpointing  # the recomputed forward repeats the collectives
        logits = tp(ids)
        loss = tp.loss(ids, labels)
        loss.backward()
        res = {"logits": _rel(logits, ref_logits), "loss": _rel(loss, ref_loss), "grads": {}, "step": {}}
        with torch.no_grad():
            hidden = tp.hidden_states(ids)[0]
            res["local_positions"] = hidden.shape[1]  # the stream really is split
            head = _head(tp, hidden, tp.head_weight)  # the pipeline's last stage
            res["pipe_head"] = float(torch.equal(head, tp.local_logits(hidden)))
            full = [torch.empty_like(head) for _ in range(world)]
            dist.all_gather(full, head)
            res["pipe_head_vs_ref"] = _rel(torch.cat(full, -1)[..., :VOCAB], ref_logits)
        ref_params = dict(ref.named_parameters())
        for n, p in tp.named_parameters():
            res["grads"][n] = _rel(_gather_unshard(n, p.grad, tp.tp_rules[n], world), ref_params[n].grad)
        # one SGD step on both (by hand: importing torch.optim costs seconds per process): every
        # replicated copy (norms, biases) must stay bit-identical
        with torch.no_grad():
            for p in [*tp.parameters(), *ref.parameters()]:
                p.sub_(0.5 * p.grad)
        for n, p in tp.named_parameters():
            rule = tp.tp_rules[n]
            if isinstance(rule, Replicate):
                parts = [torch.empty_like(p) for _ in range(world)]
                dist.all_gather(parts, p.detach().contiguous())
                assert all(torch.equal(q, parts[0]) for q in parts), f"{n}: replicated copies differ after a step"
            res["step"][n] = _rel(_gather_unshard(n, p.detach(), rule, world), ref_params[n].detach())
        # decode with the recurrent / KV cache (no sequence split)
        res["decode"] = decode_gap(tp, ref, ids, _rel)
        with torch.no_grad():
            res["split_after_decode"] = tp.hidden_states(ids)[0].shape[1]  # the split is back on
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,ckpt", [("all_biases", False), ("mqa_groups1", True), ("gqa_groups2", False)])
def test_sp_matches_tp1(name, ckpt, tmp_path):
    out = tmp_path / "res.json"
    mp.spawn(_worker, args=(2, _free_port(), name, str(out), ckpt), nprocs=2, join=True)
    res = json.loads(out.read_text())
    model = built(name)
    names = {n for n, _ in model.named_parameters()}
    assert res["local_positions"] == SEQ // 2 and res["split_after_decode"] == SEQ // 2
    assert res["logits"] < TOL and res["loss"] < TOL and res["decode"] < TOL, res
    assert res["pipe_head"] == 1.0 and res["pipe_head_vs_ref"] < TOL, res
    assert set(res["grads"]) == names == set(res["step"])
    bad = {n: e for n, e in res["grads"].items() if not e < TOL}
    assert not bad, f"gradients differ from TP=1: {bad}"
    bad = {n: e for n, e in res["step"].items() if not e < TOL}
    assert not bad, f"parameters after a step differ from TP=1: {bad}"
    if name == "all_biases":  # the replicated parameters whose gradient needs the sum are covered
        for n in ("layers.0.norm1.bias", "layers.0.mixer.o_proj.bias", "layers.1.mixer.out_proj.bias",
                  "layers.2.mixer.out_proj.bias", "layers.3.mlp.down_proj.bias", "norm_f.weight"):
            assert n in names, n


def _error_worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from megaxatl.parallel import apply_tensor_parallel

        res = {}
        singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
        try:
            apply_tensor_parallel(built("all_biases"), singles[rank], sequence_parallel=True)
        except ValueError as e:
            res["tp1"] = str(e)
        tp = apply_tensor_parallel(built("all_biases"), dist.group.WORLD, sequence_parallel=True)
        ids = torch.randint(0, VOCAB, (2, SEQ - 1))
        for what, fn in (("forward", lambda: tp(ids)), ("loss", lambda: tp.loss(ids, ids)),
                         ("cached_hidden", lambda: tp.hidden_states(ids, tp.empty_cache(2)))):
            try:
                fn()
            except ValueError as e:
                res[what] = str(e)
        res["even_ok"] = list(tp(ids[:, :-1]).shape)  # the ranks are still in step after the errors
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_sp_errors(tmp_path):
    out = tmp_path / "res.json"
    mp.spawn(_error_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    assert "tp > 1" in res["tp1"], res
    for what in ("forward", "loss"):
        assert f"L={SEQ - 1}" in res[what] and "tp=2" in res[what] and "not divisible" in res[what], res
    assert "forward(ids, cache)" in res["cached_hidden"], res
    assert res["even_ok"] == [2, SEQ - 2, VOCAB]
