"""The version gate around DeepSpeed's private state (megaxatl/train/deepspeed_internals.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from megaxatl.train import deepspeed_internals as dsi

ROOT = Path(__file__).resolve().parent.parent


def test_installed_deepspeed_passes_the_gate():
    assert dsi.check_version() == version("deepspeed")


@pytest.mark.parametrize("v", ["0.18.9", "0.19.2", "0.20.0", "1.0.0", "0.20.0rc1"])
def test_other_versions_are_refused_in_one_line(v):
    with pytest.raises(dsi.UnsupportedDeepSpeed) as e:
        dsi.check_version(v)
    msg = str(e.value)
    assert "\n" not in msg and f"deepspeed {v} is not supported" in msg
    assert f"deepspeed>={dsi.SUPPORTED[0]},<{dsi.SUPPORTED[1]}" in msg


@pytest.mark.parametrize("v", ["0.19.3", "0.19.8", "0.19.9.dev0", "0.19.8+cu128"])
def test_versions_inside_the_range_pass(v):
    assert dsi.check_version(v) == v


def test_pyproject_declares_the_gated_range():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "deepspeed"]
    for v in ["0.18.9", "0.19.2", "0.19.3", "0.19.8", "0.20.0", "0.21.1"]:
        try:
            dsi.check_version(v)
            gated = True
        except dsi.UnsupportedDeepSpeed:
            gated = False
        assert req.specifier.contains(v) == gated, v


def test_launcher_stops_with_one_line_outside_the_range(tmp_path):
    """pretrain.py refuses before building anything (the gate runs in init_distributed)."""
    code = ("import importlib.metadata as md, sys; real = md.version; "
            "md.version = lambda d: '0.99.0' if d == 'deepspeed' else real(d); "
            f"sys.argv = ['pretrain.py', '--config', {str(ROOT / 'configs' / 'tiny_hybrid.json')!r}, "
            f"'--set', 'train.out_dir={tmp_path / 'run'}']; "
            f"sys.path.insert(0, {str(ROOT / 'launchers')!r}); import pretrain; sys.exit(pretrain.main())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pretrain:")]
    assert lines == [f"pretrain: error: deepspeed 0.99.0 is not supported: the trainer reads DeepSpeed's internal "
                     f"optimizer and ZeRO state, checked on {dsi.supported_range()} "
                     f"(pip install '{dsi.supported_range()}')"]
    assert not (tmp_path / "run").exists()
