"""prepare_data: text -> shards round trip, split, determinism, atomic output, clear errors."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_data_common import (
    EOS,
    docs_of,
    make_corpus,
    make_hf_tokenizer,
    read_split_samples,
    stream_of,
)

from megaxatl.data import DataError, prepare_data, read_manifest, tokenizer_id
from megaxatl.data import prepare as prep


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory) -> Path:
    return make_hf_tokenizer(tmp_path_factory.mktemp("tok") / "tiny-bpe")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _decoded_docs(out: Path, split: str, decode) -> list[str]:
    m = read_manifest(out)
    samples = read_split_samples(out, split)
    if not samples:
        return []
    return [decode(d) for d in docs_of(stream_of(samples), m["eos_id"])]


def _check_round_trip(out: Path, docs: list[str], decode) -> dict:
    m = read_manifest(out)
    got = {s: _decoded_docs(out, s, decode) for s in ("train", "val")}
    # every document exactly once, in input order within its split, text exact
    assert sorted(got["train"] + got["val"]) == sorted(docs)
    for split in ("train", "val"):
        assert got[split] == [d for d in docs if d in set(got[split])]
        info = m["splits"][split]
        assert info["num_docs"] == len(got[split])
        samples = read_split_samples(out, split)
        # byte counts: the samples' label bytes add up to the split's source bytes exactly
        assert sum(b for _, _, b in samples) == info["num_bytes"] == \
            sum(len(d.encode()) for d in got[split])
        assert sum(n - 1 for _, n, _ in samples) == info["num_label_tokens"]
        assert all(t.shape == (m["seq_len"] + 1,) for t, _, _ in samples)
        assert all(n == m["seq_len"] + 1 for _, n, _ in samples[:-1])
    return got


def test_round_trip_hf_tokenizer(tmp_path, hf_tok, corpus):
    from transformers import AutoTokenizer

    inputs, docs = corpus
    out = tmp_path / "ds"
    m = prepare_data(inputs, out, hf_tok, seq_len=16, val_docs=6, shard_tokens=160, num_proc=1)
    tok = AutoTokenizer.from_pretrained(hf_tok)
    assert m["eos_id"] == tok.convert_tokens_to_ids(EOS)
    assert m["tokenizer"]["id"] == tokenizer_id(hf_tok) == tokenizer_id(tok)
    assert m["token_dtype"] == "<u2"
    got = _check_round_trip(out, docs, lambda ids: tok.decode(ids))
    assert len(got["val"]) == 6
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["manifest.json"] + [s["name"] for sp in ("train", "val")
                                                for s in m["splits"][sp]["shards"]])
    assert "train-000001.tar" in names and "val-000000.tar" in names
    assert len(m["splits"]["train"]["shards"]) > 2  # 10 samples per shard
    for s in m["splits"]["train"]["shards"][:-1]:
        assert s["num_samples"] == 10
    assert m["splits"]["train"]["bytes_per_token"] > 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_round_trip_trained_spm_and_parallel_is_identical(tmp_path, corpus):
    import sentencepiece as spm

    inputs, docs = corpus
    m1 = prepare_data(inputs, tmp_path / "a", train_spm=320, seq_len=32, val_fraction=0.2,
                      num_proc=1, seed=3)
    model = tmp_path / "a" / "tokenizer.model"
    assert model.is_file() and m1["tokenizer"]["file"] == "tokenizer.model"
    assert m1["tokenizer"]["id"] == tokenizer_id(model)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert m1["eos_id"] == sp.eos_id() and m1["vocab_size"] == 320
    _check_round_trip(tmp_path / "a", docs, lambda ids: sp.decode(ids))
    # the tokenizer pool (2 processes) gives byte-identical shards
    m2 = prepare_data(inputs, tmp_path / "b", train_spm=320, seq_len=32, val_fraction=0.2,
                      num_proc=2, seed=3)
    assert m2["fingerprint"] == m1["fingerprint"]
    # ... and so does an existing .model passed as the tokenizer
    m3 = prepare_data(inputs, tmp_path / "c", model, seq_len=32, val_fraction=0.2, seed=3)
    assert m3["fingerprint"] == m1["fingerprint"] and m3["tokenizer"]["id"] == m1["tokenizer"]["id"]


def test_val_split_is_by_document_and_seeded(tmp_path, hf_tok, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tok)
    inputs, docs = corpus

    def val_docs(name, **kw):
        prepare_data(inputs, tmp_path / name, hf_tok, seq_len=64, num_proc=1, **kw)
        return _decoded_docs(tmp_path / name, "val", tok.decode)

    a = val_docs("a", val_fraction=0.3, seed=1)
    assert a == val_docs("b", val_fraction=0.3, seed=1)
    assert a != val_docs("c", val_fraction=0.3, seed=2)
    assert 5 <= len(a) <= 35
    assert len(val_docs("d", val_docs=7, seed=5)) == 7
    assert val_docs("e", val_fraction=0.0) == []


def test_paragraph_mode_gz_and_long_documents(tmp_path, hf_tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tok)
    text = "first para\nline two\n\n\n  \nsecond para\n\nthird para 😀\n"
    with gzip.open(tmp_path / "p.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    prepare_data([tmp_path / "p.txt.gz"], tmp_path / "ds", hf_tok, seq_len=8, val_fraction=0,
                 txt_docs="paragraph", num_proc=1)
    assert _decoded_docs(tmp_path / "ds", "train", tok.decode) == \
        ["first para\nline two", "second para", "third para 😀"]


def test_long_documents_are_cut_into_pieces_exactly(tmp_path, hf_tok):
    """A document longer than max_piece_chars is tokenized in pieces and still decodes exactly,
    also with SentencePiece (whose dummy-prefix "\u2581" on continuation pieces is dropped)."""
    import random

    import sentencepiece as spm
    from test_data_common import make_doc
    from transformers import AutoTokenizer

    rng = random.Random(5)
    long_doc = "\n\n".join(make_doc(rng) for _ in range(60)) + "\nlast line " + "x" * 700
    (tmp_path / "long.txt").write_text(long_doc)
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": long_doc}) + "\n")
    pieces = list(prep._split_long(long_doc, 500))
    assert len(pieces) > 10 and "".join(pieces) == long_doc
    assert all(p.startswith("\n") for p in pieces[1:])
    tok = AutoTokenizer.from_pretrained(hf_tok)
    for name in ("long.txt", "long.jsonl"):
        prepare_data([tmp_path / name], tmp_path / name.replace(".", "_"), hf_tok, seq_len=8,
                     val_fraction=0, num_proc=1, max_piece_chars=500)
        assert _decoded_docs(tmp_path / name.replace(".", "_"), "train", tok.decode) == [long_doc]
    m = prepare_data([tmp_path / "long.txt"], tmp_path / "spm", train_spm=300, seq_len=8,
                     val_fraction=0, num_proc=1, max_piece_chars=500)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm" / "tokenizer.model"))
    assert _decoded_docs(tmp_path / "spm", "train", sp.decode) == [long_doc]
    assert m["splits"]["train"]["num_bytes"] == len(long_doc.encode())


def test_bad_inputs_name_the_file(tmp_path, hf_tok):
    good = tmp_path / "good.txt"
    good.write_text("some text")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n \n")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    badutf = tmp_path / "bad.txt"
    badutf.write_bytes(b"ok \xff\xfe bytes")
    emptydir = tmp_path / "emptydir"
    emptydir.mkdir()
    cases = [
        ([empty], "empty.txt"), ([good, blank], "blank.txt"), ([nofield], "nofield.jsonl:2"),
        ([badutf], "bad.txt"), ([tmp_path / "missing.txt"], "missing.txt"),
        ([emptydir], "emptydir"), ([tmp_path / "tok.csv"], "tok.csv"),
    ]
    (tmp_path / "tok.csv").write_text("a,b")
    for inputs, name in cases:
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            prepare_data(inputs, tmp_path / "out", hf_tok, seq_len=8, num_proc=1)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    with pytest.raises(DataError, match="nothere"):
        prepare_data([good], tmp_path / "out", tmp_path / "nothere", seq_len=8)
    with pytest.raises(DataError, match="exactly one"):
        prepare_data([good], tmp_path / "out", hf_tok, train_spm=300)


def test_existing_out_dir_and_atomic_overwrite(tmp_path, hf_tok, corpus, monkeypatch):
    inputs, _ = corpus
    out = tmp_path / "ds"
    m = prepare_data(inputs, out, hf_tok, seq_len=16, val_docs=3, shard_tokens=160, num_proc=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="already exists"):
        prepare_data(inputs, out, hf_tok, seq_len=16, num_proc=1)

    # a failure in the middle of writing (third shard) leaves the old dataset untouched
    real_close = prep._ShardWriter._close_shard
    calls = {"n": 0}

    def failing_close(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real_close(self)

    monkeypatch.setattr(prep._ShardWriter, "_close_shard", failing_close)
    with pytest.raises(OSError, match="simulated"):
        prepare_data(inputs, out, hf_tok, seq_len=8, val_docs=3, shard_tokens=80, num_proc=1,
                     overwrite=True)
    assert calls["n"] == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp or .old dir left
    monkeypatch.undo()

    m2 = prepare_data(inputs, out, hf_tok, seq_len=8, val_docs=3, num_proc=1, overwrite=True)
    assert read_manifest(out)["seq_len"] == 8 and m2["fingerprint"] != m["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    # overwrite never deletes a folder that is not a dataset
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(DataError, match="not a dataset"):
        prepare_data(inputs, other, hf_tok, seq_len=8, num_proc=1, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep"


def test_tokenization_pool_has_back_pressure():
    """The reader never runs more than 2 x num_proc tasks ahead of the packer (flat memory)."""
    pulled = {"n": 0}
    ahead = []

    def tasks():
        for i in range(40):
            pulled["n"] += 1
            yield [i] * 1000

    for k, result in enumerate(prep._ordered_map(len, tasks(), 2, int, ())):
        assert result == 1000
        ahead.append(pulled["n"] - (k + 1))
    assert max(ahead) <= 4 and len(ahead) == 40


def test_token_bytes_attribution_is_exact():
    from megaxatl.data.tokenizer import token_bytes

    text = "héllo 😀 wörld"
    # offsets with gaps, repeats (byte-fallback pieces of one char) and trimmed spaces
    ends = np.array([1, 1, 2, 5, 7, 7, 8, 14])
    nb = token_bytes(text, ends)
    assert nb.sum() == len(text.encode()) and (nb >= 0).all()
    assert nb[:3].tolist() == [1, 0, 2]  # "h", (nothing), "é" = 2 bytes
    assert token_bytes("abc", np.array([], dtype=np.int64)).size == 0


def test_out_dir_inside_parent_that_does_not_exist_yet(tmp_path, hf_tok):
    (tmp_path / "a.txt").write_text("hello world")
    out = tmp_path / "deep" / "er" / "ds"
    m = prepare_data([tmp_path / "a.txt"], out, hf_tok, seq_len=4, val_fraction=0, num_proc=1)
    assert m["splits"]["val"]["num_samples"] == 0 and m["splits"]["train"]["num_samples"] >= 1
    assert os.listdir(out.parent) == ["ds"]
