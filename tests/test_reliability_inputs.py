"""Hostile or unlucky inputs outside training: --overwrite onto a folder holding the input, NaN in a
config, a bad line under --train-spm, a pickle donor, token ids past the vocabulary, a full disk
during export-hf / reshard / prepare-data (a real small tmpfs where the machine allows mounting
one), the leftovers of a killed prepare-data or export, and the exit-code table. Each case was once a silent wrong
result, a traceback, or a deleted run."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_models import make_model_dir, tiny_model_config
from reliability_common import Payload, dead_pid, small_fs  # noqa: F401
from test_train_common import REPO, WORDS, clean_env

from megaxatl import exitcodes
from megaxatl.cli import main
from megaxatl.config import ConfigError, load_config
from megaxatl.data import prepare_data
from megaxatl.data.format import DataError


def only_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prog), err
    return err[0]


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def corpus(root: Path, docs: int = 12) -> Path:
    """Text enough for a 300-piece SentencePiece model (as tests/test_train_common.py's shards)."""
    import random

    rng = random.Random(0)
    root.mkdir(parents=True)
    for d in range(docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "." for _ in range(60)]
        (root / f"d{d}.txt").write_text("\n".join(lines) + "\n")
    return root


# ---- --overwrite never deletes an input -------------------------------------------------------

def test_export_hf_and_reshard_onto_the_run_folder_holding_the_input_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    make_model_dir(run / "final", "M*")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    (run / "metrics.jsonl").write_text("{}\n")
    before = tree(run)
    for argv in (["export-hf", "--model", str(run / "final"), "--out", str(run), "--overwrite"],
                 ["reshard", "--in", str(run / "final"), "--out", str(run), "--tp", "1", "--overwrite"]):
        assert main(argv) == exitcodes.BAD_INPUT
        line = only_line(capsys, f"megaxatl {argv[0]}: error: {run}: the output folder holds the input")
        assert "replacing it would delete the input" in line
        assert tree(run) == before  # the whole run is intact


def test_import_hf_prepare_data_and_transfer_never_replace_a_folder_holding_their_input(tmp_path, capsys):
    from megaxatl.export import export_hf

    make_model_dir(tmp_path / "m", "M*")
    hf = tmp_path / "outer" / "hf"
    export_hf(tmp_path / "m", hf)
    src = corpus(tmp_path / "data" / "corpus")
    cfg = tmp_path / "donor_box" / "c.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(tiny_model_config("M*")))
    before = {p: tree(p) for p in (tmp_path / "outer", tmp_path / "data", tmp_path / "donor_box")}
    cases = [
        (["import-hf", "--hf", str(hf), "--out", str(tmp_path / "outer"), "--overwrite"], tmp_path / "outer"),
        (["prepare-data", str(src), "--out", str(tmp_path / "data"), "--train-spm", "300", "--overwrite"],
         tmp_path / "data"),
        (["transfer", "--donor", str(hf), "--config", str(cfg), "--out", str(tmp_path / "donor_box"), "--overwrite"],
         tmp_path / "donor_box"),
    ]
    for argv, out in cases:
        assert main(argv) == exitcodes.BAD_INPUT, argv
        assert "holds the input" in only_line(capsys, f"megaxatl {argv[0]}: error: {out}")
    assert {p: tree(p) for p in before} == before


def test_overwrite_replaces_only_the_kind_of_folder_the_command_writes(tmp_path, capsys):
    model = make_model_dir(tmp_path / "m", "M*")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    assert main(["export-hf", "--model", str(model), "--out", str(notes), "--overwrite"]) == exitcodes.BAD_INPUT
    assert "is not an export-hf folder" in only_line(capsys, "megaxatl export-hf: error:")
    assert (notes / "thesis.tex").read_text() == "years of work"
    # an earlier output of the command is replaced
    assert main(["export-hf", "--model", str(model), "--out", str(tmp_path / "hf")]) == 0
    assert main(["export-hf", "--model", str(model), "--out", str(tmp_path / "hf"), "--overwrite"]) == 0


# ---- configs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_anywhere_in_a_config_are_refused_naming_file_and_key(tmp_path, value):
    f = tmp_path / "c.json"
    f.write_text('{"model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "pattern": "M", "d_mlp": 64},'
                 f' "train": {{"lr": {value}}}}}')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(f))}.*train\.lr.*finite number, got {value}"):
        load_config(f)
    f.write_text('{"model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "pattern": "M", "d_mlp": 64,'
                 f' "mamba": {{"expand": {value}}}}}}}')
    with pytest.raises(ConfigError, match=rf"model\.mamba\.expand.*finite"):
        load_config(f)


def test_an_empty_out_dir_is_refused(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({**tiny_model_config("M*"), "train": {"out_dir": ""}}))
    with pytest.raises(ConfigError, match=r"train\.out_dir.*must not be empty"):
        load_config(f)


# ---- data -------------------------------------------------------------------------------------

def test_train_spm_surfaces_the_bad_input_line(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({"text": f"document {i} " + "words " * 20}) for i in range(60)]
    lines[46] = '{"text": "broken'
    (src / "mix.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        prepare_data([src], tmp_path / "out", train_spm=300, seq_len=16, val_docs=1, num_proc=1)
    assert str(err.value).startswith(f"{src / 'mix.jsonl'}:47: invalid JSON")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def _corrupt_one_token(shards: Path, sample: int, value: int) -> None:
    from megaxatl.data.loader import ShardDataset

    ds = ShardDataset(shards, "train", verify=False)
    shard = ds.shards[0]
    f = shards / shard["name"]
    blob = bytearray(f.read_bytes())
    at = sample * ds.stride + 512 + len(ds._npy_header)  # the sample's first token (tar block, npy header)
    blob[at:at + ds.dtype.itemsize] = np.array([value], dtype=ds.dtype).tobytes()
    f.write_bytes(bytes(blob))


def test_token_ids_outside_the_vocabulary_are_named_as_the_sample_is_read(tmp_path):
    from megaxatl.data import build_loader
    from megaxatl.data.stream import build_stream_loader

    out = tmp_path / "shards"
    prepare_data([corpus(tmp_path / "c")], out, train_spm=300, seq_len=16, val_docs=1, num_proc=1)
    _corrupt_one_token(out, 0, 60000)
    shard = out / json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][0]["name"]
    # a dataset too large to hash at start-up (verify off): the id is caught per sample
    for workers in (0, 1):
        loader = build_loader(out, "train", micro_batch_size=1, verify=False, num_workers=workers)
        loader.dataset.num_samples = 1  # sample 0 only
        with pytest.raises(DataError, match=rf"^{re.escape(str(shard))}: sample \S+ holds token id 60000, outside "
                                            r"the vocabulary \(size 300\)"):
            next(iter(loader))
    stream = build_stream_loader(str(out), "train", micro_batch_size=1)
    with pytest.raises(DataError, match=r"holds token id 60000, outside the vocabulary \(size 300\)"):
        for _ in zip(range(200), stream):
            pass
    # and the model's smaller vocabulary bounds it further
    _corrupt_one_token(out, 0, 299)
    with pytest.raises(DataError, match=r"token id 299, outside the vocabulary \(size 290\)"):
        loader = build_loader(out, "train", micro_batch_size=1, verify=False, vocab_size=290)
        loader.dataset.num_samples = 1
        next(iter(loader))


def test_a_pickle_bin_donor_is_refused_in_one_line_and_nothing_runs(tmp_path):
    from fixtures_donors import make_tiny_donor

    from megaxatl.donors import DonorError, open_donor

    marker = tmp_path / "pwned"
    _, path = make_tiny_donor("gpt2", tmp_path / "gpt2", fmt="bin")
    torch.save({"transformer.wte.weight": Payload(marker)}, path / "pytorch_model.bin")
    with pytest.raises(DonorError) as err:
        open_donor(path)
    msg = str(err.value)
    assert msg == (f"{path / 'pytorch_model.bin'}: refused: not a weights-only file (it asks to import and call "
                   "exec); only tensors and plain data are unpickled, nothing in it was run")
    assert "weights_only=False" not in msg and not marker.exists()


# ---- a full disk, a killed run ----------------------------------------------------------------

@pytest.mark.parametrize("command", [["export-hf"], ["reshard", "--tp", "2"],
                                     ["reshard", "--to", "model-dir"]])  # the final export's writer
def test_export_hf_and_reshard_on_a_full_disk_are_one_line_exit_3_and_leave_nothing(tmp_path, small_fs, command):
    model = make_model_dir(tmp_path / "m", "M*", d_model=64)  # ~0.5 MB of weights
    disk = small_fs(256 << 10)
    inp = "--model" if command[0] == "export-hf" else "--in"
    proc = subprocess.run([sys.executable, "-m", "megaxatl", *command, inp, str(model), "--out", str(disk / "out")],
                          env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == exitcodes.IO_ERROR, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"megaxatl {command[0]}: I/O error: {disk}/\S+: No space left on device",
                                            lines[0]), lines
    assert list(disk.iterdir()) == []  # the temporary folder is gone: the disk is free again


def test_prepare_data_on_a_full_disk_is_one_line_exit_3_and_keeps_the_old_dataset(tmp_path, small_fs):
    src = corpus(tmp_path / "c", docs=40)
    disk = small_fs(400 << 10)
    prepare_data([corpus(tmp_path / "small", docs=1)], disk / "ds", train_spm=300, seq_len=16, val_docs=0,
                 num_proc=1)
    old = tree(disk / "ds")
    proc = subprocess.run([sys.executable, "-m", "megaxatl", "prepare-data", str(src), "--out", str(disk / "ds"),
                           "--train-spm", "300", "--seq-len", "16", "--val-docs", "1", "--num-proc", "1", "--overwrite"],
                          env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == exitcodes.IO_ERROR, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"megaxatl prepare-data: I/O error: {disk}/"), lines
    assert lines[0].endswith(": No space left on device")
    assert [p.name for p in disk.iterdir()] == ["ds"] and tree(disk / "ds") == old


def test_prepare_data_write_failure_without_a_small_disk(tmp_path, monkeypatch):
    """The same as above by failing the shard writer (where no tmpfs can be mounted)."""
    from megaxatl.data import prepare as prep

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prep._ShardWriter, "_write", full)
    with pytest.raises(OSError) as err:
        prepare_data([corpus(tmp_path / "c")], tmp_path / "ds", train_spm=300, seq_len=16, val_docs=1, num_proc=1)
    assert err.value.errno == errno.ENOSPC and re.search(r"/\.ds\.tmp-\S+/train-000000\.tar$", err.value.filename)
    assert exitcodes.code_of(err.value) == exitcodes.IO_ERROR
    assert list(tmp_path.iterdir()) == [tmp_path / "c"]


@pytest.mark.parametrize("command", ["prepare-data", "export-hf"])
def test_what_a_killed_prepare_data_or_export_left_is_removed_by_the_next(tmp_path, command):
    import socket

    from megaxatl.export import export_hf

    host = socket.gethostname()
    stale = [tmp_path / f".ds.tmp-{dead_pid()}@{host}-abcd", tmp_path / ".ds.tmp-1a2b3c4d"]  # ours, an older name
    alive = tmp_path / f".ds.tmp-{os.getppid()}@{host}-live"  # a writer still running: left alone
    for p in (*stale, alive):
        p.mkdir()
        (p / "train-00000.tar").write_bytes(b"x" * 1000)
    if command == "prepare-data":
        prepare_data([corpus(tmp_path / "c")], tmp_path / "ds", train_spm=300, seq_len=16, val_docs=1, num_proc=1)
    else:
        export_hf(make_model_dir(tmp_path / "m", "M*"), tmp_path / "ds")
    assert not any(p.exists() for p in stale) and alive.is_dir() and (tmp_path / "ds").is_dir()


# ---- the exit-code table ----------------------------------------------------------------------

def test_the_exit_code_table_and_the_readme_agree_and_errors_map_to_it(tmp_path, monkeypatch, capsys):
    from megaxatl.checkpoint import CheckpointError
    from megaxatl.train.trainer import TrainingDiverged

    readme = (REPO / "README.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| `(\w+)` \|", readme, flags=re.M))
    assert table == {str(getattr(exitcodes, n)): n for n in
                     ("OK", "NO_RESULT", "BAD_INPUT", "IO_ERROR", "INTERNAL", "INTERRUPTED")}
    cases = [(TrainingDiverged("x"), 1), (ConfigError("c.json", "train.lr", "bad"), 2), (CheckpointError("x"), 2),
             (FileNotFoundError(errno.ENOENT, "No such file or directory", "f"), 2),
             (OSError(errno.ENOSPC, "No space left on device", "f"), 3), (PermissionError(13, "Permission denied"), 3),
             (KeyError("bug"), 4), (KeyboardInterrupt(), 130)]
    assert [(type(e).__name__, exitcodes.code_of(e)) for e, _ in cases] == [(type(e).__name__, c) for e, c in cases]
    monkeypatch.setenv(exitcodes.TRACEBACK_DIR_ENV, str(tmp_path))
    try:
        raise KeyError("bug")
    except KeyError as e:
        assert exitcodes.report("megaxatl x", e) == exitcodes.INTERNAL
    line = only_line(capsys, "megaxatl x: internal error: KeyError: 'bug' (traceback in ")
    where = Path(re.search(r"traceback in (\S+);", line).group(1))
    assert where.parent == tmp_path and "raise KeyError" in where.read_text()
    monkeypatch.setenv(exitcodes.DEBUG_ENV, "1")
    try:
        raise KeyError("bug")
    except KeyError as e:
        exitcodes.report("megaxatl x", e)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("megaxatl x: internal error: KeyError: 'bug'")
