"""Hostile or unlucky events around a training run: a pickle payload planted in DeepSpeed's
checkpoint file, flipped bytes in it, a checkpoint corrupted before a divergence, a rejected resume,
a killed run's leftovers, a disk that fills during a save (a real small tmpfs where the machine
allows mounting one), SIGTERM reaching one rank of two."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket

import pytest
from reliability_common import Payload, dead_pid, small_fs  # noqa: F401
from test_train_common import events, launch, losses, reseal, tiny_config, train_shards, write_config  # noqa: F401

from megaxatl import exitcodes
from megaxatl.checkpoint import CheckpointError
from megaxatl.config import ConfigError, config_from_dict
from megaxatl.train import TrainingDiverged, run

MODEL_STATES = "mp_rank_00_model_states.pt"


def _two_checkpoints(out, train_shards, **over) -> dict:
    """A run stopped at step 4 with checkpoints step_2 and step_4; -> its config."""
    data = tiny_config(out, train_shards, train__steps=6, train__save_interval=2, train__eval_interval=1000, **over)
    run(config_from_dict(data), stop_after=4)
    return data


def _flip(f, at: float = 0.5, mask: int = 0x40) -> None:
    blob = bytearray(f.read_bytes())
    i = int(len(blob) * at)
    blob[i] ^= mask
    f.write_bytes(bytes(blob))


@pytest.mark.parametrize("name", [MODEL_STATES, "megaxatl_rank0.pt"])  # DeepSpeed's (model + optimizer), ours
def test_a_pickle_payload_in_a_checkpoint_file_is_refused_and_never_runs(tmp_path, train_shards, name):
    import torch

    out = tmp_path / "r"
    data = _two_checkpoints(out, train_shards)
    ck = out / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    state = torch.load(ck / name, weights_only=False)  # the test's own file: trusted here
    state["payload"] = Payload(marker)
    torch.save(state, ck / name)
    reseal(ck)  # whoever planted it rewrote the checksums too: the seal cannot catch it
    with pytest.raises(ValueError) as err:
        run(config_from_dict(data))
    assert str(err.value).startswith(f"{ck / name}: refused: not a weights-only file (it asks to import "
                                     "and call exec)")
    assert not marker.exists()
    assert exitcodes.code_of(err.value) == exitcodes.BAD_INPUT


def test_flipped_bytes_in_deepspeed_model_states_are_refused_naming_the_newest_good_checkpoint(tmp_path, train_shards):
    out = tmp_path / "r"
    data = _two_checkpoints(out, train_shards)
    bad = out / "checkpoints" / "step_00000004" / MODEL_STATES
    _flip(bad)
    with pytest.raises(CheckpointError) as err:
        run(config_from_dict(data))
    msg = str(err.value)
    assert msg.startswith(f"{bad}: checksum mismatch (corrupt or modified file)")
    assert "the newest checkpoint that verifies is step_00000002" in msg
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"  # nothing was changed
    # the launcher: one line, exit 2 (bad input), nothing trained
    proc = launch(write_config(tmp_path / "c.json", data), launcher="python")
    assert proc.returncode == exitcodes.BAD_INPUT, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"pretrain: error: {bad}: checksum mismatch")
    assert max(losses(out)) == 4
    # and a rank state file (ours) is sealed the same way
    (out / "checkpoints" / "latest").write_text("step_00000002\n")
    _flip(out / "checkpoints" / "step_00000002" / "megaxatl_rank0.pt", mask=0x01)
    with pytest.raises(CheckpointError, match=r"megaxatl_rank0\.pt: checksum mismatch.*no checkpoint in \S+ verifies"):
        run(config_from_dict(data))


def test_flipped_bytes_in_the_dcp_weights_fail_the_resume_check(tmp_path, train_shards):
    """weights/ is read only at a relayout or the final export, yet a checkpoint called verified
    (resumed from, named as the newest good one) has had its DCP files hashed too."""
    out = tmp_path / "r"
    data = _two_checkpoints(out, train_shards)
    bad = out / "checkpoints" / "step_00000004" / "weights" / ".metadata"
    _flip(bad, mask=0x01)
    with pytest.raises(CheckpointError) as err:
        run(config_from_dict(data))
    assert str(err.value).startswith(f"{bad}: checksum mismatch (corrupt or modified file)")
    assert "the newest checkpoint that verifies is step_00000002" in str(err.value)


def test_a_pickle_payload_in_dcp_metadata_is_refused_and_never_runs(tmp_path, train_shards, capsys):
    import pickle

    from megaxatl.cli import main
    from megaxatl.fsutil import sha256_file

    out = tmp_path / "r"
    _two_checkpoints(out, train_shards)
    ck = out / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    md = ck / "weights" / ".metadata"
    md.write_bytes(pickle.dumps(Payload(marker)))
    shards = json.loads((ck / "weights" / "shards.json").read_text())
    shards["sha256"][".metadata"] = sha256_file(md)  # the checksums rewritten too: the seal cannot catch it
    (ck / "weights" / "shards.json").write_text(json.dumps(shards))
    reseal(ck)
    assert main(["reshard", "--in", str(ck), "--out", str(tmp_path / "s"), "--tp", "1"]) == exitcodes.BAD_INPUT
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"megaxatl reshard: error: {re.escape(str(md))}: corrupt checkpoint index "
                        r"\(UnpicklingError: refusing to load builtins\.exec\)", line), line
    assert not marker.exists()


def test_a_divergence_names_only_a_checkpoint_that_verifies(tmp_path, train_shards):
    out = tmp_path / "r"
    cfg = config_from_dict(tiny_config(out, train_shards, train__save_interval=2, train__max_bad_steps=2,
                                       train__eval_interval=1000))
    step4 = out / "checkpoints" / "step_00000004"

    flipped = []

    def fault(step, micro):
        if step == 5 and not flipped:  # the disk corrupts the newest checkpoint, then the losses blow up
            _flip(step4 / MODEL_STATES, mask=0x7F)
            flipped.append(step)
        return step >= 5

    with pytest.raises(TrainingDiverged, match=r"The last good checkpoint is \S+step_00000002$"):
        run(cfg, fault=fault)
    assert events(out)[-1]["event"] == "diverged" and "step_00000002" in events(out)[-1]["message"]


def test_a_rejected_resume_keeps_the_runs_config_json(tmp_path, train_shards):
    out = tmp_path / "r"
    data = tiny_config(out, train_shards, train__steps=4, train__save_interval=2)
    run(config_from_dict(data), stop_after=2)
    before = (out / "config.json").read_bytes()
    other = json.loads(json.dumps(data))
    other["model"]["d_mlp"] = 96
    with pytest.raises(ConfigError, match=r"model: differs from the model of the checkpoint"):
        run(config_from_dict(other))
    assert (out / "config.json").read_bytes() == before


def test_what_a_killed_run_left_is_removed_at_the_next_start(tmp_path, train_shards):
    out = tmp_path / "r"
    data = tiny_config(out, train_shards, train__steps=4, train__save_interval=2, train__eval_interval=1000)
    run(config_from_dict(data), stop_after=2)
    host = socket.gethostname()
    left = [out / f".final.tmp-{dead_pid()}@{host}-x1y2", out / ".final.tmp-ab12cd34",  # the final export's
            out / "checkpoints" / ".tmp-step_00000004"]  # a save's
    for p in left:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"\0" * 4096)
    res = run(config_from_dict(data))
    assert res.completed and not any(p.exists() for p in left)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def _used(where) -> int:
    st = os.statvfs(where)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _pages(folder) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["deepspeed", "layout-free"])
def test_a_full_disk_during_a_save_is_one_line_exit_3_and_keeps_the_last_checkpoint(tmp_path, train_shards, small_fs,
                                                                                    where):
    disk = small_fs(64 << 20)
    out = disk / "r"
    data = tiny_config(out, train_shards, train__steps=6, train__save_interval=2, train__eval_interval=1000)
    run(config_from_dict(data), stop_after=2)
    root = out / "checkpoints"
    one = _pages(root / "step_00000002")
    ds = -(-(root / "step_00000002" / MODEL_STATES).stat().st_size // 4096) * 4096
    # room for half of DeepSpeed's file of the next checkpoint, or for it and half of the rest
    small_fs.resize(disk, _used(disk) + (ds // 2 if where == "deepspeed" else ds + (one - ds) // 2))
    cfg = write_config(tmp_path / "c.json", data)
    proc = launch(cfg, launcher="python")
    assert proc.returncode == exitcodes.IO_ERROR, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    # DCP's writer reports a full disk without the file's name: its folder is named instead
    failed = MODEL_STATES if where == "deepspeed" else "(weights|optimizer)(/\\S+)?"
    assert re.fullmatch(rf"pretrain: I/O error: {re.escape(str(root / '.tmp-step_00000004'))}/{failed}: "
                        "No space left on device", line), line
    assert "Traceback" not in proc.stderr
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # the partial save is gone
    small_fs.resize(disk, 64 << 20)  # room again: the same command resumes from step 2
    proc = launch(cfg, launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert events(out)[-1]["event"] == "done" and (out / "final").is_dir()


def test_a_full_disk_during_the_final_export_keeps_the_checkpoints(tmp_path, train_shards, monkeypatch):
    """The final export (a model folder written beside the checkpoints): by failing its write."""
    import errno

    from megaxatl.checkpoint import reshard

    out = tmp_path / "r"
    data = tiny_config(out, train_shards, train__steps=2, train__save_interval=2, train__eval_interval=1000)

    def full(file, source):
        with open(file, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(reshard, "_write_safetensors", full)
    with pytest.raises(OSError) as err:
        run(config_from_dict(data))
    assert err.value.errno == errno.ENOSPC and str(out / ".final.tmp-") in err.value.filename
    assert exitcodes.code_of(err.value) == exitcodes.IO_ERROR
    assert not (out / "final").exists() and not [p for p in out.iterdir() if p.name.startswith(".final")]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_sigterm_to_one_rank_of_two_stops_both_and_records_the_signal(tmp_path, train_shards):
    import signal
    import subprocess

    import psutil
    from test_train_common import BIN, PRETRAIN, REPO, clean_env, free_port, wait_for_steps

    out = tmp_path / "r"
    data = tiny_config(out, train_shards, train__steps=500, train__save_interval=1000, train__eval_interval=1000)
    cfg = write_config(tmp_path / "c.json", data)
    proc = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(PRETRAIN), "--config", str(cfg)], env=clean_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_steps(proc, out, 2, timeout=180)
        ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if str(PRETRAIN) in " ".join(c.cmdline()) and c.environ().get("RANK") == "1"]
        assert len(ranks) == 1, ranks
        ranks[0].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 never sees it
        _, err = proc.communicate(timeout=180)
    finally:  # the whole group: a failed test must not leave ranks training in the background
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, err[-3000:]
    (stop,) = [e for e in events(out) if e["event"] == "stop"]
    assert stop["reason"] == "signal"  # the agreed reason, written by rank 0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stop['step']:08d}"
    assert stop["step"] < 500


def _stop_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from megaxatl.train.stop import agree_stop

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:  # SIGTERM reached rank 1 only, in the step where rank 0 reached stop_after
        reasons = [agree_stop(signalled=rank == 1, step_reached=rank == 0), agree_stop(False, False),
                   agree_stop(False, rank == 1)]
        with open(f"{out}.{rank}", "w") as f:
            json.dump(reasons, f)
    finally:
        dist.destroy_process_group()


def test_the_stop_reason_is_agreed_across_ranks(tmp_path):
    import torch.multiprocessing as mp
    from test_parallel_tp import _free_port

    mp.spawn(_stop_worker, args=(2, _free_port(), str(tmp_path / "r")), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"r.{rank}").read_text()) == ["signal", None, "stop_after"]
