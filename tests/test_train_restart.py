"""Restarts after failures the trainer cannot see coming (tests/test_train_loop.py covers the
announced ones: SIGTERM, stop_after, NaN losses): a process killed with SIGKILL mid-training, a
checkpoint save that dies half-way (disk full), a corrupt checkpoint file, a missing data shard."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megaxatl.config import config_from_dict
from megaxatl.data.format import DataError
from megaxatl.train import checkpoint as ckpt
from megaxatl.train import run
from test_train_common import PRETRAIN, REPO, clean_env, events, losses, tiny_config, train_shards  # noqa: F401


def _latest_step(out) -> int | None:
    try:
        tag = (out / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None
    return int(tag.split("_")[1]) if tag.startswith("step_") else None


def _popen(cfg_path):
    return subprocess.Popen([sys.executable, str(PRETRAIN), "--config", str(cfg_path)], env=clean_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_training_then_the_same_command_resumes_exactly(tmp_path, train_shards):
    steps = 40
    over = dict(train__steps=steps, train__save_interval=5, train__eval_interval=1000, train__keep_last=2)
    ref_cfg, cfg = tmp_path / "ref.json", tmp_path / "c.json"
    ref_cfg.write_text(json.dumps(tiny_config(tmp_path / "ref", train_shards, **over)))
    cfg.write_text(json.dumps(tiny_config(tmp_path / "run", train_shards, **over)))
    out = tmp_path / "run"

    ref = _popen(ref_cfg)  # the uninterrupted run, alongside (same env: 1 thread, fp32)
    victim = _popen(cfg)
    killed_at = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and victim.poll() is None:
            saved = _latest_step(out)
            try:
                logged = max(losses(out), default=0)
            except (OSError, ValueError):
                logged = 0
            if saved and logged > saved:  # a checkpoint exists and training went on past it
                victim.send_signal(signal.SIGKILL)
                killed_at = (saved, logged)
                break
            time.sleep(0.02)
        victim.communicate(timeout=60)
    finally:
        victim.kill()
    assert killed_at is not None, "the run finished (or failed) before it could be killed"
    assert victim.returncode == -signal.SIGKILL and killed_at[1] < steps
    saved = _latest_step(out)  # a save may have completed between the check and the kill
    assert saved >= killed_at[0]

    again = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(cfg)], env=clean_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"done at step {steps}" in again.stderr
    _, ref_err = ref.communicate(timeout=180)
    assert ref.returncode == 0, ref_err[-3000:]

    resumes = [e for e in events(out) if e["event"] == "resume"]
    assert [e["step"] for e in resumes] == [saved]
    a, b = losses(tmp_path / "ref"), losses(out)
    assert sorted(b) == list(range(1, steps + 1))
    assert b == a, "losses after the SIGKILL + resume differ from the uninterrupted run's"
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())


def _disk_full(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["deepspeed-writer", "finalize"])
def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint(tmp_path, train_shards, monkeypatch, where):
    out = tmp_path / "r"
    cfg = config_from_dict(tiny_config(out, train_shards, train__steps=6, train__save_interval=2,
                                       train__eval_interval=1000))
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    real_save, real_fsync = TorchCheckpointEngine.save, ckpt.fsync_tree

    def failing_writer(self, state_dict, path):  # the second checkpoint's first file: half written, then ENOSPC
        if "step_00000004" in str(path):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a file")
            _disk_full()
        return real_save(self, state_dict, path)

    def failing_fsync(root):
        if "step_00000004" in str(root):
            _disk_full()
        return real_fsync(root)

    if where == "deepspeed-writer":
        monkeypatch.setattr(TorchCheckpointEngine, "save", failing_writer)
    else:
        monkeypatch.setattr(ckpt, "fsync_tree", failing_fsync)
    with pytest.raises(OSError, match="No space left") as err:
        run(cfg)
    root = out / "checkpoints"
    assert str(root / ".tmp-step_00000004") in str(err.value.filename)  # names the file (or the folder)
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert ckpt.find_latest(root) == root / "step_00000002"
    assert not (root / "step_00000004").exists() and not (root / ".tmp-step_00000004").exists()

    monkeypatch.undo()  # the disk has room again: the same config resumes from step 2
    res = run(cfg)
    assert res.resumed_from == 2 and res.completed and res.step == 6
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


@pytest.mark.parametrize("victim,why", [("mp_rank_00_model_states.pt", "checksum mismatch"),
                                        ("megaxatl_rank0.pt", "checksum mismatch"),
                                        ("megaxatl.json", "corrupt checkpoint metadata")])
def test_a_corrupt_checkpoint_file_is_named(tmp_path, train_shards, victim, why):
    out = tmp_path / "r"
    data = tiny_config(out, train_shards, train__steps=6, train__save_interval=100, train__eval_interval=1000)
    first = run(config_from_dict(data), stop_after=2)
    bad = first.checkpoint / victim
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ckpt.CheckpointError, match=rf"^{bad}: {why}") as err:
        run(config_from_dict(data))
    assert "step_00000002 aside" in str(err.value) and "no checkpoint" in str(err.value)
    if victim == "mp_rank_00_model_states.pt":  # and the launcher says it in one line, exit 2
        cfg = tmp_path / "c.json"
        cfg.write_text(json.dumps(data))
        proc = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(cfg)], env=clean_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith(f"pretrain: error: {bad}: checksum mismatch")


def test_a_missing_data_shard_is_named_before_training(tmp_path, train_shards):
    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    victim = sorted(shards.glob("train-*.tar"))[-1]
    victim.unlink()
    with pytest.raises(DataError, match=rf"{victim}: missing shard"):
        run(config_from_dict(tiny_config(tmp_path / "r", shards, train__steps=2)))
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


def test_a_repeated_sigterm_still_checkpoints_but_a_second_ctrl_c_gives_up():
    """Under SLURM every process of a step gets SIGTERM and then DeepSpeed's launch.py / torchrun
    forward it to the ranks again: the stop flag must survive that; Ctrl-C twice aborts at once."""
    import os

    from megaxatl.train.stop import StopSignal

    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.flag
    with StopSignal() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.flag
        os.kill(os.getpid(), signal.SIGINT)
