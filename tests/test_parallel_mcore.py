"""megatron-core carries our TP collectives (2 gloo processes): the TP model's backward graph runs
through its mappings, its async-dgrad column matmul and its cross-entropy steps; the vocab-parallel
cross entropy equals F.cross_entropy (fp32, padded vocab rows, ignored labels) and refuses a second
backward instead of returning a wrong gradient."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from test_parallel_tp import built

pytestmark = pytest.mark.multiprocess


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from megaxatl.parallel import apply_tensor_parallel, vocab_parallel_cross_entropy

        res = {}
        # cross entropy: 13 real classes padded to 16, 8 per rank; two ignored labels
        g = torch.Generator().manual_seed(0)
        full = torch.randn(10, 16, generator=g, dtype=torch.float64)
        target = torch.randint(0, 13, (10,), generator=g)
        target[[2, 7]] = -100
        ref_in = full[:, :13].clone().requires_grad_(True)
        ref = F.cross_entropy(ref_in, target)
        ref.backward()
        local = full[:, rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(local, target, rank * 8, 13, dist.group.WORLD)
        loss.backward(retain_graph=True)
        ref_grad = torch.cat([ref_in.grad, torch.zeros(10, 3, dtype=torch.float64)], 1)[:, rank * 8:(rank + 1) * 8]
        res["ce_loss"] = abs(float(loss.detach() - ref.detach()))
        res["ce_grad"] = float((local.grad - ref_grad).abs().max())
        try:
            loss.backward()
            res["second_backward"] = "ran"
        except RuntimeError as e:
            res["second_backward"] = str(e)
        # the TP model's graph: megatron-core's autograd functions
        model = apply_tensor_parallel(built("gqa_groups2"), dist.group.WORLD)
        ids = torch.randint(0, 395, (2, 8), generator=g)
        res["graph"] = sorted(_graph_names(model.loss(ids, ids)))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_megatron_core_carries_the_tp_collectives(tmp_path):
    out = tmp_path / "res.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    assert res["ce_loss"] < 1e-6 and res["ce_grad"] < 1e-6, res  # megatron computes the CE in fp32
    assert "second backward" in res["second_backward"]
    graph = set(res["graph"])
    for fn in ("_CopyToModelParallelRegionBackward", "_ReduceFromModelParallelRegionBackward",
               "LinearWithGradAccumulationAndAsyncCommunicationBackward", "_VocabParallelCEBackward"):
        assert fn in graph, (fn, sorted(graph))
