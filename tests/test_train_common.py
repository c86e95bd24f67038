"""Builders shared by the tests/test_train_*.py files (no tests here): tiny shards, tiny configs,
launching 1-2 CPU ranks, reading losses and checkpointed weights. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "launchers" / "pretrain.py"
BIN = Path(sys.executable).parent
SEQ_LEN = 32
WORDS = "the cat dog sat on a mat and ran to big small red blue house tree".split()


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """~1k training samples of 33 tokens from a 300-piece SentencePiece model, 4 val documents."""
    from megaxatl.data import prepare_data

    root = tmp_path_factory.mktemp("train_data")
    src = root / "corpus"
    src.mkdir()
    rng = random.Random(0)
    for d in range(40):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "." for _ in range(60)]
        (src / f"doc{d:03d}.txt").write_text("\n".join(lines) + "\n")
    prepare_data([src], root / "shards", train_spm=300, seq_len=SEQ_LEN, val_docs=4, num_proc=1)
    return root / "shards"


def set_dotted(data: dict, key: str, value) -> None:
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def tiny_config(out_dir: Path, shards: Path, **overrides) -> dict:
    """A 2-layer '*M' model (d_model 32) on the tiny shards. Overrides: dotted keys with '__' for '.'."""
    data = {
        "model": {"vocab_size": 300, "d_model": 32, "n_layers": 2, "pattern": "*M", "d_mlp": 64, "n_heads": 2,
                  "max_seq_len": 64, "mamba": {"d_state": 8}},
        "data": {"train_shards": str(shards), "seq_len": SEQ_LEN, "micro_batch_size": 4},
        "train": {"steps": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "dtype": "fp32", "eval_interval": 4,
                  "eval_steps": 2, "save_interval": 4, "keep_last": 3, "out_dir": str(out_dir)},
        "logging": {"log_interval": 1, "progress": False},
    }
    for k, v in overrides.items():
        set_dotted(data, k.replace("__", "."), v)
    return data


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


def losses(out_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def records(out_dir: Path) -> dict[int, dict]:
    """step -> the train record of metrics.jsonl (loss, grad_norm, lr, ...)."""
    recs = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r for r in recs if r["kind"] == "train"}


def events(out_dir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in recs if r["kind"] == "event"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    """The environment for a launched run: no rendezvous variables leaked from an in-process run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def launch(config: Path, nproc: int = 1, launcher: str = "torchrun", extra: list[str] = (),
           timeout: int = 240, script: Path = PRETRAIN) -> subprocess.CompletedProcess:
    args = ["--config", str(config), *extra]
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, str(script), *args]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a training checkpoint folder (any ZeRO stage), by global name."""
    meta = json.loads((ckpt / "megaxatl.json").read_text())
    if meta["config"]["parallel"]["zero_stage"] == 0:
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        import contextlib
        import io

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float().clone() for k, v in state.items()}


def reseal(ckpt: Path) -> None:
    """Seal training checkpoint `ckpt` again over its files as they are now (what someone who
    changed a file and rewrote the checksums too would leave)."""
    from megaxatl.checkpoint.seal import seal_folder

    meta = json.loads((ckpt / "megaxatl.json").read_text())
    seal_folder(ckpt, "megaxatl.json", {k: v for k, v in meta.items() if k not in ("sha256", "seal")})


def make_init_dir(cfg_data: dict, out: Path, seed: int = 7) -> tuple[dict, list[str]]:
    """A model folder like a `megaxatl transfer` output: random weights, and 'transferred' = the
    embedding, norms, MLPs and W_O (what the default copy mode copies). -> (weights, names)."""
    from megaxatl.checkpoint import save_model_dir
    from megaxatl.config import config_from_dict, config_to_dict
    from megaxatl.models import build

    cfg = config_from_dict(cfg_data)
    torch.manual_seed(seed)
    model = build(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    transferred = [n for n in state if n.startswith(("embed", "norm_f")) or ".norm" in n or ".mlp." in n
                   or n.endswith("o_proj.weight")]
    save_model_dir(out, state, {"config": config_to_dict(cfg), "transferred": transferred, "report": {"donor": "test"}})
    return state, transferred


def wait_for_steps(proc: subprocess.Popen, out_dir: Path, steps: int, timeout: float) -> None:
    """Until run `out_dir` has logged `steps` losses, `proc` has exited, or `timeout` s passed."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(losses(out_dir)) >= steps:
                return
        except (OSError, ValueError):  # not there yet, or a line being written
            pass
        time.sleep(0.2)


def signal_after_two_steps(proc: subprocess.Popen, out_dir: Path, sig: int) -> tuple[int, str]:
    """Once run `out_dir` has logged two steps (or after 120 s), send `sig` to `proc`; -> (the
    step it stopped at, its stderr), asserting it exited 0 with `latest` at that step."""
    try:
        wait_for_steps(proc, out_dir, 2, timeout=120)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    step = max(losses(out_dir))
    assert (Path(out_dir) / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    return step, err


def continue_in(src: Path, dst: Path, data: dict, **parallel) -> dict:
    """Copy run folder `src` to `dst`; -> config `data` set to resume there with `parallel`."""
    import shutil

    shutil.copytree(src, dst)
    data = json.loads(json.dumps(data))
    data["parallel"] = parallel
    data["train"]["out_dir"] = str(dst)
    return data


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
