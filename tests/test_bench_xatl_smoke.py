"""benchmarks/xatl_vs_scratch.py in a two-step smoke run: arms, curves and report fields."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_xatl_vs_scratch_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "xatl_vs_scratch.py"), "--quick", "--steps", "2",
           "--eval-interval", "1", "--arms", "scratch,emb+norm+mlp+oproj", "--tag", "smoke",
           "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results" / "xatl_vs_scratch_smoke.json").read_text())
    arms = res["variants"]["hybrid"]["arms"]
    assert list(arms) == ["scratch", "emb+norm+mlp+oproj"]
    for name, arm in arms.items():
        assert [r["step"] for r in arm["curve"]] == [0, 1, 2]
        assert all(r["val_loss"] > 0 and r["val_bpb"] > 0 for r in arm["curve"])
        assert "speedup" in arm
    assert arms["scratch"]["speedup"]["speedup"] == 1.0 and arms["scratch"]["speedup"]["steps_to_target"] == 2.0
    assert (tmp_path / "results" / "xatl_vs_scratch_smoke.png").stat().st_size > 10_000
