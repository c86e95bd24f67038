"""Streaming loader (megaxatl/data/stream.py): prepare-data's shards read by webdataset itself,
and streamed through `pipe:cat` with the batches, DP partition and resume of the local path."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from test_data_common import make_corpus, make_hf_tokenizer

from megaxatl.data import DataError, build_loader, prepare_data
from megaxatl.data.loader import ShardDataset
from megaxatl.data.stream import build_stream_loader, shard_url

SEQ = 8
MODEL = {"vocab_size": 512, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_mlp": 32, "pattern": "*", "max_seq_len": 64}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    tok = make_hf_tokenizer(root / "tok")
    inputs, _ = make_corpus(root, n_docs=40)
    out = root / "ds"
    # ~100 train samples in shards of 16 (the last one shorter), ~10 val samples
    prepare_data(inputs, out, tok, seq_len=SEQ, val_docs=4, shard_tokens=16 * SEQ, num_proc=1)
    return out


@pytest.fixture(scope="module")
def table(dataset) -> dict[tuple, int]:
    ds = ShardDataset(dataset, "train")
    out = {tuple(ds[i]["input_ids"].tolist()): i for i in range(len(ds))}
    assert len(out) == len(ds)
    return out


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_webdataset_reads_prepare_data_shards(dataset):
    """webdataset.WebDataset (its own tar reader and .npy / .json decoders) gets every sample the
    random-access reader does, in stored order, with the same meta."""
    ds = ShardDataset(dataset, "train")
    urls = [str(dataset / s["name"]) for s in ds.shards]
    wds = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    got = list(wds)
    assert len(got) == len(ds) > 0
    for i, sample in enumerate(got):
        tokens, num_tokens, num_bytes = ds.read(i)
        assert sample["__key__"] == f"{i:010d}"
        assert sample["input_ids.npy"].dtype == tokens.dtype
        assert np.array_equal(sample["input_ids.npy"], tokens)
        assert sample["meta.json"] == {"num_bytes": num_bytes, "num_tokens": num_tokens}


def test_pipe_cat_streams_the_local_batches_and_resumes(dataset, table):
    local = build_stream_loader(dataset, "train", 3, SEQ, seed=5)
    piped = build_stream_loader(f"pipe:cat {dataset}/{{name}}", "train", 3, SEQ, seed=5)
    n = local.shards.num_samples
    steps = n // 3 + 5  # across the epoch boundary
    a, b = _take(local, steps), _take(piped, steps)
    _same(a, b)
    assert local.state_dict() == piped.state_dict() and local.consumed_samples == 3 * steps
    # epoch 0 visits every sample once; the order is shard-permuted, not stored order
    first = [table[tuple(r.tolist())] for batch in a for r in batch["input_ids"]][:n]
    assert sorted(first) == list(range(n)) and first != list(range(n))
    # labels: next tokens, -100 past the real ones, as the random-access loader's
    ra = ShardDataset(dataset, "train")
    for batch in a[:4]:
        for row, lab, nb in zip(batch["input_ids"], batch["labels"], batch["num_bytes"]):
            ref = ra[table[tuple(row.tolist())]]
            assert torch.equal(lab, ref["labels"]) and int(nb) == ref["num_bytes"]
    # resume at step k from the saved state (through the pipe) = the uninterrupted run from there
    k = 11
    run = build_stream_loader(f"pipe:cat {dataset}/{{name}}", "train", 3, SEQ, seed=5)
    _take(run, k)
    state = run.state_dict()
    resumed = build_stream_loader(f"pipe:cat {dataset}/{{name}}", "train", 3, SEQ, seed=5, state=state)
    _same(_take(resumed, steps - k), a[k:])
    assert resumed.consumed_samples == local.consumed_samples
    # another seed, another order
    other = _take(build_stream_loader(dataset, "train", 3, SEQ, seed=6), 4)
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(other, a[:4]))


@pytest.mark.parametrize("world", [2, 3])
def test_dp_ranks_partition_every_epoch(dataset, table, world):
    B = 2
    loaders = [build_stream_loader(dataset, "train", B, SEQ, dp_rank=r, dp_world=world, seed=1) for r in range(world)]
    n = loaders[0].shards.num_samples
    steps = 2 * n // (B * world) + 1
    per_rank = [[table[tuple(row.tolist())] for batch in _take(ld, steps) for row in batch["input_ids"]]
                for ld in loaders]
    # interleave back into the global stream: step m, rank r, slot b
    stream = [per_rank[r][m * B + b] for m in range(steps) for r in range(world) for b in range(B)]
    single = [table[tuple(row.tolist())] for batch in _take(build_stream_loader(dataset, "train", B * world, SEQ,
                                                                                seed=1), steps)
              for row in batch["input_ids"]]
    assert stream == single  # the same global order at any DP size
    for e in range(2):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))


@pytest.mark.parametrize("world", [1, 4])
def test_validation_is_one_padded_pass(dataset, world):
    ra = [build_loader(dataset, "val", 3, SEQ, dp_rank=r, dp_world=world) for r in range(world)]
    st = [build_stream_loader(f"pipe:cat {dataset}/{{name}}", "val", 3, SEQ, dp_rank=r, dp_world=world)
          for r in range(world)]
    for a, b in zip(ra, st):
        assert len(a) == len(b)
        _same(list(a), list(b))  # the random-access loader's batches, padding included


def test_random_access_state_is_refused(dataset):
    ra = build_loader(dataset, "train", 2, SEQ, seed=5)
    _take(ra, 2)
    with pytest.raises(DataError, match="random-access"):
        build_stream_loader(dataset, "train", 2, SEQ, seed=5, state=ra.state_dict())


def test_bad_streams_are_named(dataset, tmp_path):
    bad = tmp_path / "ds"
    shutil.copytree(dataset, bad)
    name = sorted(p.name for p in bad.glob("train-*.tar"))[1]
    data = (bad / name).read_bytes()
    (bad / name).write_bytes(data[: len(data) // 2])  # truncated
    loader = build_stream_loader(f"pipe:cat {bad}/{{name}}", "train", 4, SEQ, seed=0)
    with pytest.raises(DataError, match=name):
        _take(loader, 40)
    (bad / name).unlink()  # missing: cat fails, the pipe's status is an error naming the URL
    loader = build_stream_loader(f"pipe:cat {bad}/{{name}}", "train", 4, SEQ, seed=0)
    with pytest.raises(DataError, match=name):
        _take(loader, 40)
    with pytest.raises(DataError, match="manifest"):
        build_stream_loader(f"pipe:cat {tmp_path}/nowhere/{{name}}", "train", 2, SEQ)
    with pytest.raises(DataError, match="{name}"):
        shard_url("pipe:cat /x/ds", "train-000000.tar")


def test_stream_state_is_refused_by_the_random_access_loader(dataset):
    st = build_stream_loader(dataset, "train", 2, SEQ, seed=5)
    _take(st, 2)
    with pytest.raises(DataError, match="stream"):
        build_loader(dataset, "train", 2, SEQ, seed=5, state=st.state_dict())


def test_the_trainer_streams_when_the_config_says_so(dataset):
    from megaxatl.config import ConfigError, config_from_dict
    from megaxatl.data.stream import StreamLoader
    from megaxatl.train.data import build_loaders

    data = {"train_shards": f"pipe:cat {dataset}/{{name}}", "seq_len": SEQ, "micro_batch_size": 2}
    with pytest.raises(ConfigError, match="data.access: stream"):
        config_from_dict({"model": MODEL, "data": data})
    cfg = config_from_dict({"model": MODEL, "data": {**data, "access": "stream"}})
    train, val, manifest = build_loaders(cfg, 0, 1, None)
    assert isinstance(train, StreamLoader) and isinstance(val, StreamLoader)
    assert manifest["splits"]["train"]["num_samples"] == train.dataset.num_samples
    ref = build_stream_loader(dataset, "train", 2, SEQ, seed=cfg.data.seed)
    _same(_take(train, 3), _take(ref, 3))


def test_http_streams_the_local_batches(dataset):
    """An http(s) prefix: webdataset fetches each shard with curl, from a local HTTP server here."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    if shutil.which("curl") is None:
        pytest.fail("curl (webdataset's http(s) reader) is not installed")
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(dataset))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        _same(_take(build_stream_loader(url, "train", 4, SEQ, seed=2), 30),
              _take(build_stream_loader(dataset, "train", 4, SEQ, seed=2), 30))
    finally:
        server.shutdown()
        server.server_close()
