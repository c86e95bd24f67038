"""The cluster job templates (launchers/slurm/*.sbatch, launchers/torchrun_single_node.sh) rendered
with fake SLURM environments and fake `scontrol` / `srun` / `scancel` on PATH: the node list, the
hostfile, the rendezvous, the layout, the launch commands, and the preemption trap (forward
SIGTERM, wait, requeue). Nothing here starts a real training run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaxatl.cluster.nodelist import expand
from test_train_common import train_shards  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "launchers" / "slurm" / "pretrain.sbatch"
SBATCH_TR = REPO / "launchers" / "slurm" / "pretrain_torchrun.sbatch"
SINGLE = REPO / "launchers" / "torchrun_single_node.sh"
COMMON = REPO / "launchers" / "slurm" / "_common.sh"
CONFIG = "configs/mamba_2.8b.json"  # tp 2, pp 1, 32 layers, 32 heads

FAKE_SCONTROL = f"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then exec {sys.executable} -m megaxatl.cluster.nodelist "$3"; fi
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_LOG"
kill -TERM "$(cat "$FAKE_PIDFILE")"
"""
# A long-running launcher: logs its argv, then waits for SIGTERM (exit 0) or exits with FAKE_RC.
FAKE_LAUNCHER = """#!/bin/bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
trap 'echo "$(basename "$0") got TERM" >> "$FAKE_LOG"; exit 0' TERM
echo $$ > "$FAKE_PIDFILE"
if [[ -n "${FAKE_RC:-}" ]]; then exit "$FAKE_RC"; fi
for _ in $(seq 600); do sleep 0.1; done
exit 9
"""


def fake_bin(tmp_path: Path, scontrol: bool = True) -> Path:
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    tools = {"srun": FAKE_LAUNCHER, "scancel": FAKE_SCANCEL, "torchrun": FAKE_LAUNCHER}
    if scontrol:
        tools["scontrol"] = FAKE_SCONTROL
    for name, text in tools.items():
        (b / name).write_text(text)
        (b / name).chmod(0o755)
    return b


def slurm_env(tmp_path: Path, scontrol: bool = True, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for k in ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "DRY_RUN", "LAUNCHER", "MAX_RESTARTS", "NPROC"):
        env.pop(k, None)
    env.update(PATH=f"{fake_bin(tmp_path, scontrol)}:{env['PATH']}", MEGAXATL_REPO=str(REPO), PYTHON=sys.executable,
               FAKE_LOG=str(tmp_path / "calls.log"), FAKE_PIDFILE=str(tmp_path / "launcher.pid"),
               HOSTFILE=str(tmp_path / "hostfile"), SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="gpu[01-03,07]",
               SLURM_NNODES="4", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="64", SLURM_SUBMIT_DIR=str(REPO))
    env.update(extra)
    return env


def render(script: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=env.get("FAKE_CWD", "/"),
                          capture_output=True, text=True, timeout=60)


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("script", [SBATCH, SBATCH_TR, SINGLE, COMMON], ids=lambda p: p.name)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_nodelist_parser_matches_scontrol_syntax():
    assert expand("gpu[01-03,07]") == ["gpu01", "gpu02", "gpu03", "gpu07"]
    assert expand("a1,b[8-10],c") == ["a1", "b8", "b9", "b10", "c"]
    assert expand("r[1-2]-n[01-02]") == ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]
    assert expand("node[009-011]") == ["node009", "node010", "node011"]
    for bad in ("gpu[01-03", "gpu[3-1]", "gpu[a-b]"):
        with pytest.raises(ValueError, match="node list"):
            expand(bad)


@pytest.mark.parametrize("with_scontrol", [True, False], ids=["scontrol", "python-fallback"])
def test_deepspeed_sbatch_dry_run(tmp_path, with_scontrol):
    env = slurm_env(tmp_path, scontrol=with_scontrol)
    proc = render(SBATCH, env, "--dry-run", "--config", CONFIG, "--set", "train.steps=10")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "4 nodes x 8 GPUs: gpu01 gpu02 gpu03 gpu07" in out
    assert "layout: TP 2 x PP 1 x DP 16 = 32 ranks (4 nodes x 8 GPUs)" in out
    assert "MASTER_ADDR=gpu01 MASTER_PORT=21234 OMP_NUM_THREADS=8" in out
    assert [f"  gpu{n} slots=8" for n in ("01", "02", "03", "07")] == \
        [line for line in out.splitlines() if line.startswith("  gpu")]
    launch = [line for line in out.splitlines() if line.startswith("+ ")]
    assert len(launch) == 1 and launch[0].startswith("+ srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c")
    assert launch[0].endswith(f"_ launchers/pretrain.py --config {CONFIG} --set train.steps=10")
    node = [line for line in out.splitlines() if line.startswith("each node runs:")][0]
    assert f"deepspeed --hostfile {tmp_path / 'hostfile'} --no_ssh --master_addr gpu01 --master_port 21234 " \
           f"--node_rank=$SLURM_NODEID launchers/pretrain.py --config {CONFIG} --set train.steps=10" in node
    assert "--dry-run" not in node
    assert not (tmp_path / "hostfile").exists(), "a dry run wrote the hostfile"
    used = calls(tmp_path)
    assert used == (["scontrol show hostnames gpu[01-03,07]"] if with_scontrol else [])


def test_srun_launcher_and_env_dry_run(tmp_path):
    env = slurm_env(tmp_path, DRY_RUN="1", LAUNCHER="srun", SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:4",
                    SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES="2", MASTER_PORT="29999")
    proc = render(SBATCH, env, "--config", CONFIG)
    assert proc.returncode == 0, proc.stderr
    assert "layout: TP 2 x PP 1 x DP 4 = 8 ranks (2 nodes x 4 GPUs)" in proc.stdout
    assert "MASTER_ADDR=n1 MASTER_PORT=29999" in proc.stdout
    launch = [line for line in proc.stdout.splitlines() if line.startswith("+ ")][0]
    assert launch.startswith("+ srun --nodes=2 --ntasks-per-node=4 ")
    assert r"RANK=\$SLURM_PROCID" in launch and launch.endswith(f"{sys.executable} --config {CONFIG}")


def test_torchrun_sbatch_dry_run(tmp_path):
    env = slurm_env(tmp_path, MAX_RESTARTS="5")
    proc = render(SBATCH_TR, env, "--dry-run", "--config", CONFIG, "--set", "train.lr=1e-4")
    assert proc.returncode == 0, proc.stderr
    assert "layout: TP 2 x PP 1 x DP 16 = 32 ranks" in proc.stdout
    launch = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert launch == [f"+ srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 {Path(sys.executable).parent}/torchrun "
                      "--nnodes=4 --nproc-per-node=8 --max-restarts=5 --rdzv-backend=c10d "
                      "--rdzv-endpoint=gpu01:21234 --rdzv-id=1234 launchers/pretrain.py "
                      f"--config {CONFIG} --set train.lr=1e-4"]


def test_single_node_dry_run(tmp_path):
    env = slurm_env(tmp_path, NPROC="2", DRY_RUN="1")
    proc = render(SINGLE, env, "--config", "configs/tiny_hybrid.json")
    assert proc.returncode == 0, proc.stderr
    assert "layout: TP 1 x PP 1 x DP 2 = 2 ranks (1 node x 2 GPUs)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == (f"+ {Path(sys.executable).parent}/torchrun --standalone --nnodes=1 "
                                            "--nproc-per-node=2 --max-restarts=0 launchers/pretrain.py "
                                            "--config configs/tiny_hybrid.json")


@pytest.mark.parametrize("env_over, args, message", [
    ({"SLURM_NNODES": "3"}, ["--config", CONFIG], "SLURM_NNODES=3 but the node list 'gpu[01-03,07]' names 4 hosts"),
    ({"SLURM_GPUS_ON_NODE": "3"}, ["--config", CONFIG], "tp 2 must divide the 3 GPUs of a node"),
    ({}, ["--set", "a=b"], "--config C is required"),
    ({"SLURM_JOB_NODELIST": "gpu[01-"}, ["--config", CONFIG], "cannot parse node list"),
], ids=["nnodes", "layout", "no-config", "bad-nodelist"])
def test_bad_inputs_fail_in_one_line(tmp_path, env_over, args, message):
    env = slurm_env(tmp_path, scontrol=False, DRY_RUN="1", **env_over)
    proc = render(SBATCH, env, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not any(line.startswith("+ ") for line in proc.stdout.splitlines())


def _start(script: Path, env: dict, tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", str(script), "--config", CONFIG if script != SINGLE else "configs/tiny_hybrid.json"],
                            env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "launcher.pid").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("script, sig", [(SBATCH, signal.SIGUSR1), (SBATCH_TR, signal.SIGTERM)],
                         ids=["deepspeed-usr1", "torchrun-term"])
def test_preemption_forwards_term_waits_and_requeues(tmp_path, script, sig):
    proc = _start(script, slurm_env(tmp_path), tmp_path)
    try:
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    log = calls(tmp_path)
    assert log[0] == "scontrol show hostnames gpu[01-03,07]" and log[1].startswith("srun --nodes=4")
    # forwarded to the job steps, the launcher stopped, and only then the job was requeued
    assert log[2:] == ["scancel --signal=TERM 1234", "srun got TERM", "scontrol requeue 1234"], log
    if script == SBATCH:
        assert (tmp_path / "hostfile").read_text().splitlines() == [f"gpu{n} slots=8" for n in ("01", "02", "03", "07")]


def test_a_failed_run_is_not_requeued_and_keeps_its_exit_code(tmp_path):
    proc = _start(SBATCH_TR, slurm_env(tmp_path, FAKE_RC="3"), tmp_path)
    proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert not any(c.startswith(("scancel", "scontrol requeue")) for c in calls(tmp_path))


def test_single_node_forwards_term_to_torchrun(tmp_path):
    env = slurm_env(tmp_path, NPROC="1", TORCHRUN=str(tmp_path / "bin" / "torchrun"))
    proc = _start(SINGLE, env, tmp_path)
    try:
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    log = calls(tmp_path)
    assert log[0].startswith("torchrun --standalone --nnodes=1 --nproc-per-node=1") and log[1:] == ["torchrun got TERM"]


def test_single_node_script_really_stops_a_cpu_run_with_a_checkpoint(tmp_path, train_shards):
    """Real torchrun, real trainer (1 CPU rank): SIGUSR1 to the script -> SIGTERM to torchrun ->
    to the rank -> a checkpoint at the step it stopped on, exit 0, (resuming is tests/test_train_restart.py's)."""
    import json

    from test_train_common import clean_env, events, signal_after_two_steps, tiny_config

    out = tmp_path / "run"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(tiny_config(out, train_shards, train__steps=100000, train__save_interval=100000,
                                          train__eval_interval=100000)))
    env = {**clean_env(), "NPROC": "1", "MEGAXATL_REPO": str(REPO), "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(SINGLE), "--config", str(cfg)], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step, _ = signal_after_two_steps(proc, out, signal.SIGUSR1)
    assert events(out)[-1] == {**events(out)[-1], "event": "stop", "reason": "signal", "step": step}
