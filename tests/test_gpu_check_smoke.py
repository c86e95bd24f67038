"""benchmarks/gpu_check.py is the prepared GPU check; here it runs on CPU through the Triton
interpreter at tiny sizes, so the script that waits for a GPU is known to work end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_under_the_interpreter(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--repeats", "1",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert [r["op"] for r in res["correctness"]] == ["selective_scan", "ssd_scan", "causal_conv1d"]
    assert all(r["ok"] and r["max_rel_rms"] < 1e-4 for r in res["correctness"])
    assert {r["backend"] for r in res["selective_scan"]} >= {"triton", "torch"} and res["copy_GBps"] > 0


def test_gpu_check_refuses_cpu_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
