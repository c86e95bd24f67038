"""`megaxatl eval`: loss / perplexity / bits per byte on a text file (exact bytes) and on prepared shards,
equal to a direct computation; one-line errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures_models import make_model_dir
from test_data_common import make_corpus, make_doc, make_hf_tokenizer

from megaxatl.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("evalcli") / "model", pattern="M*")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(5)
    p = tmp_path_factory.mktemp("evaltext") / "held_out.txt"
    p.write_text("\n\n".join(make_doc(rng) for _ in range(6)), encoding="utf-8")  # unicode: bytes != chars
    return p


def _run(capsys, *argv) -> tuple[int, dict | None, str]:
    rc = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else None), err


def test_text_file_matches_direct_computation(ckpt, text_file, capsys):
    from megaxatl.checkpoint import load_model
    from transformers import AutoTokenizer

    S = 32
    rc, res, err = _run(capsys, "--ckpt", ckpt, "--data", text_file, "--seq-len", S, "--batch-size", 3)
    assert rc == 0, err
    assert "eval: batch" in err  # the progress line
    text = text_file.read_text(encoding="utf-8")
    assert res["bytes"] == len(text.encode("utf-8")) and len(text.encode()) > len(text)
    # direct: the stream EOS text EOS, cut into windows of S predictions, each window from scratch
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    model = load_model(ckpt)[0].eval()
    stream = [tok.eos_token_id] + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, S):
            inp, lab = stream[s:s + S], stream[s + 1:s + S + 1]
            logits = model(torch.tensor([inp[:len(lab)]]))[0]
            nll += float(F.cross_entropy(logits.float(), torch.tensor(lab), reduction="sum"))
            n += len(lab)
    assert res["tokens"] == n
    assert res["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert res["bpb"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)
    assert res["kind"] == "text" and res["seq_len"] == S


def test_jsonl_and_max_batches(ckpt, tmp_path, capsys):
    rng = random.Random(7)
    docs = [make_doc(rng) for _ in range(5)]
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    rc, full, err = _run(capsys, "--ckpt", ckpt, "--data", p, "--text-field", "body", "--seq-len", 16,
                         "--batch-size", 2, "--no-progress")
    assert rc == 0, err
    assert full["bytes"] == sum(len(d.encode()) for d in docs) and err == ""
    rc, part, _ = _run(capsys, "--ckpt", ckpt, "--data", p, "--text-field", "body", "--seq-len", 16,
                       "--batch-size", 2, "--max-batches", 1, "--no-progress")
    assert rc == 0 and part["batches"] == 1 and part["samples"] == 2 and part["tokens"] <= 32 < full["tokens"]


def test_shards_val_split(ckpt, tmp_path, capsys):
    from megaxatl.data import prepare_data

    inputs, _ = make_corpus(tmp_path, n_docs=20)
    manifest = prepare_data(inputs, tmp_path / "ds", ckpt / "tokenizer", seq_len=24, val_docs=4, num_proc=1)
    val = manifest["splits"]["val"]
    rc, res, err = _run(capsys, "--ckpt", ckpt, "--data", tmp_path / "ds", "--batch-size", 4)
    assert rc == 0, err
    assert res["kind"] == "shards" and res["split"] == "val" and res["seq_len"] == 24
    assert res["samples"] == val["num_samples"]
    assert res["tokens"] == val["num_label_tokens"] and res["bytes"] == val["num_bytes"]
    rc, res1, _ = _run(capsys, "--ckpt", ckpt, "--data", tmp_path / "ds", "--batch-size", 1, "--no-progress")
    assert res1["loss"] == pytest.approx(res["loss"], rel=1e-5)  # batching does not change the result
    # a --seq-len that is not the shards' is refused
    rc, _, err = _run(capsys, "--ckpt", ckpt, "--data", tmp_path / "ds", "--seq-len", 16)
    assert rc == 2 and "seq_len 24" in err and len(err.strip().splitlines()) == 1


def test_errors_are_one_line(ckpt, text_file, tmp_path, capsys):
    from megaxatl.data import prepare_data

    inputs, _ = make_corpus(tmp_path, n_docs=12)
    other = make_hf_tokenizer(tmp_path / "other_tok", vocab_size=300)
    prepare_data(inputs, tmp_path / "ds_other", other, seq_len=16, val_docs=2, num_proc=1)
    cases = [
        (["--ckpt", tmp_path / "nope", "--data", text_file], "nope: input folder missing"),
        (["--ckpt", tmp_path / "ds_other", "--data", text_file], "not a model folder"),
        (["--ckpt", ckpt, "--data", tmp_path / "missing.txt"], "no such file"),
        (["--ckpt", ckpt, "--data", tmp_path / "ds_other"], "tokenizer"),
        (["--ckpt", ckpt, "--data", text_file, "--batch-size", 0], "--batch-size"),
    ]
    for argv, needle in cases:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("megaxatl eval: error:") and needle in lines[0], err


def test_a_sharded_copy_evaluates_like_the_model_folder(ckpt, text_file, tmp_path, capsys):
    """--ckpt takes any weights folder `megaxatl reshard` reads: a TP 2 x PP 2 sharded copy of the
    model scores exactly as the model folder (its tokenizer travels with it)."""
    from megaxatl.checkpoint.reshard import reshard

    reshard(ckpt, tmp_path / "tp2pp2", tp=2, pp=2)
    rc, a, err = _run(capsys, "--ckpt", ckpt, "--data", text_file, "--seq-len", 32)
    assert rc == 0, err
    rc, b, err = _run(capsys, "--ckpt", tmp_path / "tp2pp2", "--data", text_file, "--seq-len", 32)
    assert rc == 0, err
    assert (b["loss"], b["tokens"], b["bpb"]) == (a["loss"], a["tokens"], a["bpb"])
