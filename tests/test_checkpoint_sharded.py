"""Sharded weights (DCP, global keys) and `megaxatl reshard`: every mixer survives A -> B -> A
bit for bit, plain torch.distributed.checkpoint reads the files, a TP rank loads exactly its
tp_rules.shard_tensor part from any layout, a real 2-process gloo save works, and every damaged
input is an error naming the file, before anything is written."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaxatl.checkpoint import CheckpointError, load_model_dir, save_model_dir
from megaxatl.checkpoint.reshard import DictSource, reshard, save_model_dir_streaming
from megaxatl.checkpoint.seal import seal_folder
from megaxatl.checkpoint.sharded import (
    Chunk,
    ShardedCheckpoint,
    check_layout,
    checkpoint_keys,
    load_sharded,
    local_chunks,
    read_full,
    save_sharded,
    verify_sharded_dir,
    write_layout,
)
from megaxatl.cli import main
from megaxatl.config import config_from_dict, config_to_dict
from megaxatl.models import build
from megaxatl.parallel.stages import stage_bounds, stage_of_key
from megaxatl.parallel.tp_rules import Replicate, model_rules, shard_state_dict, shard_tensor

REPO = Path(__file__).resolve().parents[1]

# One tiny model per mixer (4 heads, d_inner 64, padded vocab 400: tp 1 / 2 / 4 all divide).
# KV heads and Mamba-2 groups below tp are held as copies: attention 2 KV heads at tp 4,
# retention 1 KV head, Mamba-2 1 group (< tp) and 2 groups (== tp 2, < tp 4).
CONFIGS = {
    "attention_gqa": dict(pattern="**", n_kv_heads=2, qkv_bias=True, attn_out_bias=True, tie_embeddings=False),
    "mamba1": dict(pattern="MM", norm="layernorm", mlp="gelu", mamba={"d_state": 8, "expand": 2.0, "proj_bias": True}),
    "mamba2_groups1": dict(pattern="SS"),
    "mamba2_groups2": dict(pattern="SS", mamba2={"d_state": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8,
                                                 "proj_bias": True}),
    "retention": dict(pattern="RR", n_kv_heads=1),
    "gla": dict(pattern="GG", n_kv_heads=2),
    "hybrid": dict(pattern="M*SRG", n_kv_heads=1, parallel_residual=True, tie_embeddings=False),
}
PAIRS = [((1, 1), (2, 2)), ((2, 1), (1, 2)), ((4, 1), (2, 2))]


def config_dict(name: str) -> dict:
    over = dict(CONFIGS[name])
    pattern = over.pop("pattern")
    model = {"vocab_size": 395, "pad_vocab_multiple": 8, "d_model": 32, "n_layers": len(pattern), "pattern": pattern,
             "d_mlp": 64, "n_heads": 4, "max_seq_len": 64, "rotary_pct": 0.5, "norm": "rmsnorm", "mlp": "swiglu",
             "mamba": {"d_state": 8, "expand": 2.0},
             "mamba2": {"d_state": 16, "head_dim": 16, "n_groups": 1, "chunk_size": 8},
             "retention": {"chunk_size": 8}, "gla": {"chunk_size": 8}}
    model.update(over)
    return config_to_dict(config_from_dict({"model": model}))


def weights(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build(config_from_dict(config_dict(name)))
    with torch.no_grad():  # distinct values everywhere (norm weights start at 1, biases at 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (model folder, its weights), made once per module."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in CONFIGS:
        sd = weights(name)
        tok = root / f"{name}-tok"
        tok.mkdir()
        (tok / "tokenizer.json").write_text("{}")
        save_model_dir(root / name, sd, {"config": config_dict(name), "step": 7, "transferred": ["embed.weight"]},
                       tokenizer_dir=tok)
        out[name] = (root / name, sd)
    return out


def assert_same(got: dict, want: dict, what: str = "") -> None:
    assert sorted(got) == sorted(want), f"{what}: keys differ"
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{what}: '{k}' differs"


def chunk_index(path: Path) -> dict:
    md = ShardedCheckpoint(path).metadata
    return {k: sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks) for k, v in md.state_dict_metadata.items()}


# ---- chunks ------------------------------------------------------------------------------------

def test_local_chunks_pieces_copies_and_replicas():
    sd = weights("hybrid")
    rules = model_rules(build(config_from_dict(config_dict("hybrid"))))
    # Mamba-1 in_proj packs [x, z] (64 + 64 rows): two chunks per rank, each at its global offset
    xz = rules["layers.0.mixer.in_proj.weight"]
    assert local_chunks("in_proj", xz, (128, 32), 1, 2) == [Chunk(0, 32, 0, 32, True), Chunk(0, 96, 32, 32, True)]
    # 1 KV head (8 rows) over 4 ranks: every rank holds a copy, rank 0 alone writes it
    kv = rules["layers.1.mixer.k_proj.weight"]
    assert [local_chunks("k", kv, (8, 32), r, 4) for r in range(4)] == \
        [[Chunk(0, 0, 0, 8, r == 0)] for r in range(4)]
    # Mamba-2 in_proj [z, x, B, C, dt] with 1 group at tp 2: z, x, dt split, B and C copied
    zxbcdt = rules["layers.2.mixer.in_proj.weight"]
    r1 = local_chunks("in_proj", zxbcdt, sd["layers.2.mixer.in_proj.weight"].shape, 1, 2)
    assert [(c.global_offset, c.size, c.owner) for c in r1] == [(32, 32, True), (96, 32, True), (128, 16, False),
                                                               (144, 16, False), (162, 2, True)]
    assert [c.local_offset for c in r1] == [0, 32, 64, 80, 96]
    norm = rules["layers.0.norm1.weight"]
    assert isinstance(norm, Replicate)
    assert [local_chunks("n", norm, (32,), r, 2)[0].owner for r in range(2)] == [True, False]
    # the chunks are exactly shard_tensor's local layout
    for key, full in sd.items():
        for r in range(4):
            local = shard_tensor(key, full, rules[key], r, 4)
            for c in local_chunks(key, rules[key], full.shape, r, 4):
                assert torch.equal(c.local(local), c.of_global(full)), key


# ---- reshard round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reshard_round_trip_bit_identical(folders, tmp_path, name):
    src, sd = folders[name]
    for i, (a, b) in enumerate(PAIRS):
        pa, pb, pa2 = tmp_path / f"{i}a", tmp_path / f"{i}b", tmp_path / f"{i}a2"
        reshard(src, pa, *a)
        reshard(pa, pb, *b)
        reshard(pb, pa2, *a)
        for p, layout in ((pa, a), (pb, b), (pa2, a)):
            assert_same(read_full(p), sd, f"{name} {p.name}")
            meta = json.loads((p / "shards.json").read_text())
            assert meta["layout"] == {"tp": layout[0], "pp": layout[1]} and meta["format"] == "megaxatl-sharded"
            assert len(list(p.glob("*.distcp"))) == layout[0] * layout[1]
            assert (p / "tokenizer" / "tokenizer.json").is_file() and meta["step"] == 7
        assert chunk_index(pa2) == chunk_index(pa)
    back = tmp_path / "full"
    reshard(pa2, back, to="model-dir")
    state, meta = load_model_dir(back)
    assert_same(state, sd, "model-dir")
    assert meta["config"] == config_dict(name) and meta["transferred"] == ["embed.weight"]


def test_reshard_cli_and_the_pipeline_split(folders, tmp_path):
    src, sd = folders["hybrid"]
    out = tmp_path / "s"
    assert main(["reshard", "--in", str(src), "--out", str(out), "--tp", "2", "--pp", "3"]) == 0
    cfg = config_from_dict(config_dict("hybrid"))
    bounds = stage_bounds(cfg.model, 3)
    md = ShardedCheckpoint(out).metadata
    for idx, info in md.storage_data.items():  # each virtual rank's file holds its stage's keys only
        rank = int(info.relative_path.split("_")[2])
        assert stage_of_key(idx.fqn, bounds) == rank // 2, (idx.fqn, info.relative_path)
    assert main(["reshard", "--in", str(out), "--out", str(tmp_path / "m"), "--to", "model-dir"]) == 0
    assert_same(load_model_dir(tmp_path / "m")[0], sd)


# ---- DCP interop and loading into TP-local tensors ------------------------------------------------

def test_plain_dcp_reads_the_full_state_dict(folders, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src, sd = folders["hybrid"]
    reshard(src, tmp_path / "s", 2, 2)
    dcp_to_torch_save(tmp_path / "s", tmp_path / "full.pt")
    assert_same(torch.load(tmp_path / "full.pt", weights_only=True), sd, "dcp_to_torch_save")
    state = {k: torch.zeros_like(v) for k, v in sd.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp_path / "s"), no_dist=True)
    assert_same(state, sd, "dcp.load")
    assert checkpoint_keys(tmp_path / "s") == {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


@pytest.mark.parametrize("name", ["attention_gqa", "mamba1", "mamba2_groups1", "mamba2_groups2", "hybrid"])
def test_load_sharded_at_another_layout_is_shard_tensor(folders, tmp_path, name):
    src, sd = folders[name]
    rules = model_rules(build(config_from_dict(config_dict(name))))
    for layout in ((2, 1), (1, 2), (4, 1)):
        path = tmp_path / f"{layout}"
        reshard(src, path, *layout)
        for tp in (1, 2, 4):
            for r in range(tp):
                local = {k: torch.full_like(shard_tensor(k, v, rules[k], r, tp), float("nan")) for k, v in sd.items()}
                load_sharded(path, local, rules, r, tp)
                assert_same(local, shard_state_dict(sd, rules, r, tp), f"{name} {layout} -> tp {tp} rank {r}")


def test_single_process_save_sharded_and_training_checkpoint_input(folders, tmp_path):
    src, sd = folders["mamba2_groups2"]
    rules = model_rules(build(config_from_dict(config_dict("mamba2_groups2"))))
    ck = tmp_path / "checkpoints" / "step_00000005"
    save_sharded(ck / "weights", sd, rules, None, 0, 1)  # no process group: a single-process save
    assert_same(read_full(ck / "weights"), sd)
    tok = tmp_path / "tok"
    tok.mkdir()
    seal = {"config": config_dict("mamba2_groups2"), "step": 5, "tokenizer_dir": str(tok), "layout": {"tp": 1, "pp": 1}}
    seal_folder(ck, "megaxatl.json", seal)  # what the trainer writes last: every file's sha256
    (ck.parent / "latest").write_text("step_00000005\n")
    out = tmp_path / "out"
    reshard(ck.parent, out, 2, 1)  # the checkpoints root stands for the checkpoint `latest` names
    assert_same(read_full(out), sd)
    reshard(ck.parent / "latest", tmp_path / "out2", 1, 1)  # and so does the `latest` file itself
    assert_same(read_full(tmp_path / "out2"), sd)
    meta = json.loads((out / "shards.json").read_text())
    assert meta["step"] == 5 and meta["resharded_from"]["kind"] == "training checkpoint"
    assert (out / "tokenizer").is_dir()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        save_sharded(ck / "weights", sd, rules, None, 0, 1)


def test_writing_streams_one_tensor_at_a_time(folders, tmp_path):
    _, sd = folders["hybrid"]
    layout = check_layout(config_from_dict(config_dict("hybrid")).model, 2, 2)

    class Watched(DictSource):
        """Fails if an earlier full tensor is still alive when the next one is read."""

        def __init__(self, state):
            super().__init__(state)
            self.alive: list = []

        def read(self, key):
            live = [r for r in self.alive if r() is not None]
            assert not live, f"reading '{key}' while {len(live)} earlier tensor(s) are still held"
            t = self.state[key].clone()
            self.alive.append(weakref.ref(t))
            return t

    tensors, nbytes = write_layout(tmp_path / "s", Watched(sd), layout)
    assert tensors == len(sd) and nbytes >= sum(v.numel() * 4 for v in sd.values())
    assert_same(read_full(tmp_path / "s"), sd)
    save_model_dir_streaming(tmp_path / "m", Watched(sd), config_dict("hybrid"))
    assert_same(load_model_dir(tmp_path / "m")[0], sd)


# ---- inputs from DeepSpeed -------------------------------------------------------------------------

def _deepspeed_meta(name: str, zero: int) -> dict:
    cfg = config_dict(name)
    cfg["parallel"] = {**cfg.get("parallel", {}), "zero_stage": zero}
    return {"config": config_to_dict(config_from_dict(cfg)), "step": 3, "layout": {"tp": 1, "pp": 1, "dp": 1}}


def test_deepspeed_zero0_checkpoint(folders, tmp_path):
    _, sd = folders["gla"]
    ck = tmp_path / "step_00000003"
    ck.mkdir()
    # the layout of DeepSpeed's ZeRO-0 mp_rank_00_model_states.pt (the weights under "module")
    torch.save({"module": sd, "buffer_names": [], "param_shapes": None, "ds_version": "0.19.8",
                "ds_config": {"zero_optimization": {"stage": 0}}, "global_steps": 3}, ck / "mp_rank_00_model_states.pt")
    seal_folder(ck, "megaxatl.json", _deepspeed_meta("gla", 0))
    assert main(["reshard", "--in", str(ck), "--out", str(tmp_path / "s"), "--tp", "2"]) == 0
    assert_same(read_full(tmp_path / "s"), sd)


_DS_SCRIPT = r"""
import json, os, socket, sys
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_checkpoint_sharded import _deepspeed_meta, weights
from megaxatl.checkpoint.seal import seal_folder
from megaxatl.config import config_from_dict
from megaxatl.models import build
import deepspeed
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=0, world_size=1)
meta = _deepspeed_meta("hybrid", 1)
model = build(config_from_dict(meta["config"]))
model.load_state_dict(weights("hybrid"))
ds = {{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 1}}, "steps_per_print": 1 << 30,
      "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
engine.save_checkpoint({root!r}, tag="step_00000003")
seal_folder(os.path.join({root!r}, "step_00000003"), "megaxatl.json", meta)
"""


def test_deepspeed_zero1_checkpoint_is_consolidated(folders, tmp_path):
    """A real DeepSpeed ZeRO-1 checkpoint (its fp32 master weights sit in the optimizer state)."""
    _, sd = folders["hybrid"]
    root = tmp_path / "checkpoints"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _DS_SCRIPT.format(tests=str(Path(__file__).parent), root=str(root))],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "step_00000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert main(["reshard", "--in", str(root / "step_00000003"), "--out", str(tmp_path / "s"), "--tp", "2",
                 "--pp", "2"]) == 0
    assert_same(read_full(tmp_path / "s"), sd)


# ---- a real multi-process save ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    errors = {}
    try:
        root_ = Path(root)
        sd = torch.load(root_ / "sd.pt", weights_only=True)
        cfg = config_from_dict(config_dict("hybrid"))
        rules = model_rules(build(cfg))
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        # TP 2: each rank its own shards (copied KV head / Mamba-2 group written once)
        save_sharded(root_ / "tp2", shard_state_dict(sd, rules, rank, 2), rules, shapes, rank, 2, writer=True)
        # PP 2: each stage its own keys
        bounds = stage_bounds(cfg.model, 2)
        mine = {k: v for k, v in sd.items() if stage_of_key(k, bounds) == rank}
        save_sharded(root_ / "pp2", mine, rules, shapes, 0, 1, writer=True)
        # DP 2: the replica writes nothing but takes part
        save_sharded(root_ / "dp2", sd, rules, shapes, 0, 1, writer=rank == 0)
        # a misconfigured job: both replicas write -> every rank gets the same clear error
        try:
            save_sharded(root_ / "twice", sd, rules, shapes, 0, 1, writer=True)
        except CheckpointError as e:
            errors["twice"] = str(e)
    finally:
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(errors))
        dist.destroy_process_group()


def test_two_process_gloo_save_loads_at_tp1(tmp_path):
    sd = weights("hybrid")
    torch.save(sd, tmp_path / "sd.pt")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name in ("tp2", "pp2", "dp2"):
        assert_same(read_full(tmp_path / name), sd, name)
    assert sorted(p.name for p in (tmp_path / "tp2").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    rules = model_rules(build(config_from_dict(config_dict("hybrid"))))
    local = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    load_sharded(tmp_path / "tp2", local, rules, 0, 1)
    assert_same(local, sd, "tp2 -> tp1")
    for r in range(2):
        err = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert "more than once" in err.get("twice", ""), err
    assert not (tmp_path / "twice" / ".metadata").exists()


# ---- errors ------------------------------------------------------------------------------------

def test_bad_layout_fails_before_writing(folders, tmp_path, capsys):
    src, _ = folders["attention_gqa"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"tp=3 does not divide: .*heads 4"):
        reshard(src, out, 3, 1)
    assert main(["reshard", "--in", str(src), "--out", str(out), "--tp", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tp=8 does not divide" in err and "heads 4" in err
    assert main(["reshard", "--in", str(src), "--out", str(out), "--pp", "3"]) == 2
    assert "pp=3" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder left behind


def test_existing_out_needs_overwrite(folders, tmp_path, capsys):
    src, sd = folders["retention"]
    out = tmp_path / "out"
    assert main(["reshard", "--in", str(src), "--out", str(out), "--tp", "2"]) == 0
    assert "2 x pp=1" in capsys.readouterr().out.replace("tp=2 x", "2 x")
    before = (out / "shards.json").read_text()
    assert main(["reshard", "--in", str(src), "--out", str(out), "--tp", "4"]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "shards.json").read_text() == before
    assert main(["reshard", "--in", str(src), "--out", str(out), "--tp", "4", "--overwrite"]) == 0
    assert json.loads((out / "shards.json").read_text())["layout"] == {"tp": 4, "pp": 1}
    assert_same(read_full(out), sd)
    assert main(["reshard", "--in", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_damaged_shards_are_named(folders, tmp_path, capsys):
    src, _ = folders["mamba1"]
    good = tmp_path / "good"
    reshard(src, good, 2, 1)
    # deleted
    gone = tmp_path / "gone"
    reshard(good, gone, 2, 1)
    (gone / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: shard file missing"):
        read_full(gone)
    assert main(["reshard", "--in", str(gone), "--out", str(tmp_path / "o1")]) == 2
    assert "__1_0.distcp" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    # corrupt, in a sharded model folder: the checksum names it
    bad = tmp_path / "bad"
    reshard(good, bad, 2, 1)
    f = bad / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: checksum mismatch"):
        read_full(bad)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: checksum mismatch"):
        verify_sharded_dir(bad)
    assert verify_sharded_dir(good)["layout"] == {"tp": 2, "pp": 1}
    # raw DCP files (a training checkpoint's weights/, no checksums): truncated, then garbage
    raw = tmp_path / "raw"
    reshard(good, raw, 2, 1)
    (raw / "shards.json").unlink()
    f = raw / "__1_0.distcp"
    whole = f.read_bytes()
    f.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: shard file truncated"):
        read_full(raw)
    f.write_bytes(os.urandom(len(whole)))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: corrupt shard file"):
        read_full(raw)
    # the index itself: missing, or a pickle that would run code
    (raw / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: missing"):
        read_full(raw)
    (raw / ".metadata").write_bytes(pickle.dumps(os.system))
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_full(raw)
    with pytest.raises(CheckpointError, match="folder missing"):
        read_full(tmp_path / "absent")


def test_missing_key_and_shape_mismatch(folders, tmp_path):
    src, sd = folders["mamba2_groups1"]
    reshard(src, tmp_path / "s", 2, 1)
    rules = {**model_rules(build(config_from_dict(config_dict("mamba2_groups1")))), "extra.weight": Replicate()}
    with pytest.raises(CheckpointError, match="no tensor 'extra.weight'"):
        load_sharded(tmp_path / "s", {"extra.weight": torch.zeros(3)}, rules, 0, 1)
    key = "layers.0.mixer.in_proj.weight"
    with pytest.raises(CheckpointError, match=f"shape mismatch for '{key}'"):
        load_sharded(tmp_path / "s", {key: torch.zeros(10, 32)}, rules, 0, 2)
    # weights that do not fit the folder's config
    bad = dict(sd)
    bad.pop("norm_f.weight")
    save_model_dir(tmp_path / "m", bad, {"config": config_dict("mamba2_groups1")})
    with pytest.raises(CheckpointError, match="missing \\['norm_f.weight'\\]"):
        reshard(tmp_path / "m", tmp_path / "o", 2, 1)
    assert not (tmp_path / "o").exists()

