"""`megaxatl prepare-data` wiring: success summary, one-line errors, no traceback."""

from __future__ import annotations

import argparse

import pytest
from test_data_common import make_hf_tokenizer

from megaxatl.data.cli import add_prepare_data_args, main, run_prepare_data


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("cli") / "tok")


def test_cli_prepares_and_reports(tmp_path, tok, capsys):
    (tmp_path / "a.txt").write_text("hello world, this is a test\n")
    (tmp_path / "b.jsonl").write_text('{"body": "second document"}\n{"body": "third"}\n')
    args = ["--out", str(tmp_path / "ds"), "--tokenizer", str(tok), "--seq-len", "8",
            "--val-docs", "1", "--text-field", "body", "--num-proc", "1"]
    assert main([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")] + args) == 0
    out = capsys.readouterr().out
    assert "train " in out and "val 1 samples" in out and "1 docs" in out
    assert (tmp_path / "ds" / "manifest.json").is_file()
    # the parser can be mounted under the top-level CLI as a subcommand
    top = argparse.ArgumentParser(prog="megaxatl")
    sub = top.add_subparsers(dest="cmd")
    add_prepare_data_args(sub.add_parser("prepare-data"))
    ns = top.parse_args(["prepare-data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "ds2"),
                         "--train-spm", "300", "--seq-len", "8", "--val-fraction", "0"])
    assert run_prepare_data(ns) == 0
    assert (tmp_path / "ds2" / "tokenizer.model").is_file()


@pytest.mark.parametrize("case", ["empty", "exists", "missing", "tokenizer"])
def test_cli_errors_are_one_line(tmp_path, tok, capsys, case):
    good = tmp_path / "good.txt"
    good.write_text("text")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "exists").mkdir()
    inputs, out, tokarg, needle = {
        "empty": ([str(tmp_path / "empty.txt")], tmp_path / "o", str(tok), "empty.txt"),
        "exists": ([str(good)], tmp_path / "exists", str(tok), "already exists"),
        "missing": ([str(tmp_path / "nope")], tmp_path / "o", str(tok), "nope"),
        "tokenizer": ([str(good)], tmp_path / "o", str(tmp_path / "notok"), "notok"),
    }[case]
    rc = main(inputs + ["--out", str(out), "--tokenizer", tokarg, "--seq-len", "8"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("megaxatl prepare-data: error: ") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
