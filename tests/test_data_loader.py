"""build_loader: DP x worker sharding, epochs, resume, determinism, validation pass, bad shards."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_common import make_corpus, make_hf_tokenizer

from megaxatl.data import (
    DataError,
    IndexPermutation,
    build_loader,
    prepare_data,
    verify_shards,
)
from megaxatl.data.loader import EvalBatchSampler, ShardDataset, TrainBatchSampler

SEQ = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    tok = make_hf_tokenizer(root / "tok")
    inputs, _ = make_corpus(root, n_docs=40)
    out = root / "ds"
    # ~100 train samples in shards of 16, ~10 val samples
    prepare_data(inputs, out, tok, seq_len=SEQ, val_docs=4, shard_tokens=16 * SEQ, num_proc=1)
    return out


@pytest.fixture(scope="module")
def sample_ids(dataset) -> dict[str, dict[tuple, int]]:
    """Map each sample's input_ids to its index, per split (samples are all distinct)."""
    out = {}
    for split in ("train", "val"):
        ds = ShardDataset(dataset, split)
        table = {tuple(ds[i]["input_ids"].tolist()): i for i in range(len(ds))}
        assert len(table) == len(ds)
        out[split] = table
    return out


def _ids(batch, table) -> list[int]:
    return [table[tuple(row.tolist())] for row in batch["input_ids"]]


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_permutation_is_a_bijection_and_seeded():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        p = IndexPermutation(n, seed=0, epoch=0)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n))
    a = IndexPermutation(1000, 0, 0)(np.arange(1000))
    assert not (a == np.arange(1000)).all()
    assert (a == IndexPermutation(1000, 0, 0)(np.arange(1000))).all()
    assert not (a == IndexPermutation(1000, 1, 0)(np.arange(1000))).all()
    assert not (a == IndexPermutation(1000, 0, 1)(np.arange(1000))).all()
    big = IndexPermutation(10**11, 5, 0)(np.arange(10**5))  # no table: O(1) memory
    assert len(np.unique(big)) == 10**5 and big.max() < 10**11


@pytest.mark.parametrize("n,B,world", [(10, 3, 1), (97, 4, 2), (100, 5, 3), (7, 2, 3)])
def test_samplers_cover_each_epoch_exactly_once(n, B, world):
    G = B * world
    steps = 3 * n // G + 2
    per_rank = [list(itertools.islice(iter(TrainBatchSampler(n, B, r, world, seed=9)), steps))
                for r in range(world)]
    stream = [i for s in range(steps) for r in range(world) for i in per_rank[r][s]]
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n)), f"epoch {e}"
    assert stream[:n] != stream[n:2 * n] or n < 3  # the shuffle advances with the epoch
    ev = [list(EvalBatchSampler(n, B, r, world)) for r in range(world)]
    assert len({len(x) for x in ev}) == 1  # same number of batches on every rank
    flat = [i for x in ev for b in x for i in b if i is not None]
    assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_dp_ranks_and_workers_partition_every_epoch(dataset, sample_ids, world, workers):
    table = sample_ids["train"]
    n = len(table)
    B = 4
    steps = -(-2 * n // (B * world))  # two epochs and a bit
    per_rank = []
    for r in range(world):
        loader = build_loader(dataset, "train", B, SEQ, dp_rank=r, dp_world=world, seed=1,
                              num_workers=workers)
        batches = _take(loader, steps)
        assert all(b["input_ids"].shape == (B, SEQ) and b["input_ids"].dtype == torch.long
                   for b in batches)
        per_rank.append([_ids(b, table) for b in batches])
        assert loader.consumed_samples == steps * B * world
    stream = [i for s in range(steps) for r in range(world) for i in per_rank[r][s]]
    assert sorted(stream[:n]) == list(range(n))
    assert sorted(stream[n:2 * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # epoch 1 is shuffled differently


def test_labels_are_next_tokens_and_bytes_counted(dataset):
    ds = ShardDataset(dataset, "train")
    loader = build_loader(dataset, "train", 5, SEQ, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels", "num_bytes"}
    ids, labels = batch["input_ids"], batch["labels"]
    for row in range(5):
        full = None
        for i in range(len(ds)):  # find the stored sample
            t, n, _ = ds.read(i)
            if (torch.from_numpy(t[:-1].astype(np.int64)) == ids[row]).all():
                full = t.astype(np.int64)
                break
        assert full is not None
        valid = labels[row] != -100
        assert (labels[row][valid] == torch.from_numpy(full[1:])[valid]).all()
    assert (batch["num_bytes"] > 0).all()


def test_resume_matches_uninterrupted_run(dataset):
    kw = dict(dp_rank=1, dp_world=2, seed=7)
    reference = _take(build_loader(dataset, "train", 3, SEQ, **kw), 40)  # > 1 epoch
    for workers_a, workers_b in ((2, 2), (2, 0), (0, 2)):
        a = build_loader(dataset, "train", 3, SEQ, num_workers=workers_a, **kw)
        it = iter(a)
        first = [next(it) for _ in range(13)]  # workers have prefetched beyond this
        state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
        assert state["consumed_samples"] == 13 * 3 * 2
        del it
        b = build_loader(dataset, "train", 3, SEQ, num_workers=workers_b, **kw)
        b.load_state_dict(state)
        rest = _take(b, 27)
        for x, y in zip(first + rest, reference):
            assert torch.equal(x["input_ids"], y["input_ids"])
            assert torch.equal(x["labels"], y["labels"])
    c = build_loader(dataset, "train", 3, SEQ, consumed_samples=13 * 6, **kw)
    assert torch.equal(next(iter(c))["input_ids"], reference[13]["input_ids"])
    with pytest.raises(DataError, match="seed"):
        build_loader(dataset, "train", 3, SEQ, dp_rank=1, dp_world=2, seed=8, state=state)


def test_order_is_seeded(dataset):
    def order(seed):
        return torch.cat([b["input_ids"] for b in _take(build_loader(dataset, "train", 4, SEQ,
                                                                     seed=seed), 10)])
    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))


@pytest.mark.parametrize("world", [1, 3])
def test_validation_is_one_padded_pass(dataset, sample_ids, world):
    table = sample_ids["val"]
    n = len(table)
    seen, lengths = [], set()
    for r in range(world):
        loader = build_loader(dataset, "val", 4, SEQ, dp_rank=r, dp_world=world,
                              num_workers=2 if r == 0 else 0)
        batches = list(loader)
        assert len(batches) == len(loader) == -(-n // (4 * world))
        assert list(loader)[0]["input_ids"].equal(batches[0]["input_ids"])  # re-iterable
        lengths.add(len(batches))
        for b in batches:
            for row, nb, lab in zip(b["input_ids"], b["num_bytes"], b["labels"]):
                if (lab == -100).all() and nb == 0:
                    continue  # padding sample
                seen.append(table[tuple(row.tolist())])
    assert len(lengths) == 1
    assert sorted(seen) == list(range(n))


def test_wrong_tokenizer_id_is_refused(dataset):
    real = json.loads((dataset / "manifest.json").read_text())["tokenizer"]["id"]
    build_loader(dataset, "train", 2, SEQ, expected_tokenizer_id=real)
    with pytest.raises(DataError) as e:
        build_loader(dataset, "train", 2, SEQ, expected_tokenizer_id="sha256:0123abcd")
    assert real in str(e.value) and "sha256:0123abcd" in str(e.value)
    assert "manifest.json" in str(e.value)
    with pytest.raises(DataError, match="seq_len"):
        build_loader(dataset, "train", 2, SEQ + 1)


def _copy(dataset, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(dataset, dst)
    return dst


def test_corrupt_shard_is_named(dataset, tmp_path):
    ds = _copy(dataset, tmp_path)
    shard = ds / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[2690:2698] = bytes(b ^ 0xFF for b in data[2690:2698])  # sample 1 tokens: 2048 + 512 + 128
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-000002.tar.*sha256"):
        build_loader(ds, "train", 2, SEQ, verify=True)
    with pytest.raises(DataError, match="train-000002.tar"):
        verify_shards(ds)
    with pytest.raises(DataError, match="train-000002.tar"):  # "auto" verifies small datasets
        build_loader(ds, "train", 2, SEQ)
    # without hashing, a damaged tar header is still caught on read, naming the file
    data[0:4] = b"XXXX"
    shard.write_bytes(bytes(data))
    loader = build_loader(ds, "train", 2, SEQ, verify=False, num_workers=0)
    with pytest.raises(DataError, match="train-000002.tar.*corrupt"):
        loader.dataset.read(32)


def test_missing_or_truncated_shard_is_named(dataset, tmp_path):
    ds = _copy(dataset, tmp_path)
    (ds / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="train-000001.tar.*missing"):
        build_loader(ds, "train", 2, SEQ, verify=False)
    shutil.copy(dataset / "train-000001.tar", ds / "train-000001.tar")
    with open(ds / "val-000000.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="val-000000.tar.*truncated"):
        build_loader(ds, "val", 2, SEQ, verify=False)
    build_loader(ds, "train", 2, SEQ)  # the train split is unaffected
    (ds / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest"):
        build_loader(ds, "train", 2, SEQ)
