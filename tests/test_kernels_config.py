"""The config's `kernels` section end to end: validated at load, applied by the trainer at
start-up (strict: one line naming the op and why), the chosen backend per op in the start event
(metrics.jsonl) and in `megaxatl info`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys

import pytest

from megaxatl.config import ConfigError, config_from_dict
from megaxatl.kernels import dispatch, policy
from megaxatl.train import run
from test_train_common import PRETRAIN, REPO, clean_env, events, tiny_config, train_shards  # noqa: F401 (fixture)

OPS = list(dispatch.REGISTRY)
MODEL = {"vocab_size": 10, "d_model": 8, "n_layers": 1, "pattern": "M", "mlp": "none"}


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for var in ("MEGAXATL_KERNELS", "MEGAXATL_KERNELS_STRICT", "TRITON_INTERPRET",
                *(f"MEGAXATL_KERNEL_{op.upper()}" for op in OPS)):
        monkeypatch.delenv(var, raising=False)
    yield
    policy.reset()


def kernels_error(section) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": MODEL, "kernels": section})
    return str(e.value)


def test_config_section_accepts_one_name_or_one_per_op_and_names_bad_entries():
    assert config_from_dict({"model": MODEL}).kernels.backend == "auto"
    assert config_from_dict({"model": MODEL, "kernels": {"backend": "torch"}}).kernels.backend == "torch"
    k = config_from_dict({"model": MODEL, "kernels": {"backend": {"selective_scan": "cuda"}, "strict": True}}).kernels
    assert k.backend == {"selective_scan": "cuda"} and k.strict
    assert "kernels.backend: 'fast' is not a kernel backend" in kernels_error({"backend": "fast"})
    assert "kernels.backend.selective_scn: unknown kernel op" in kernels_error({"backend": {"selective_scn": "cuda"}})
    assert ("kernels.backend.ssd_state_update: op 'ssd_state_update' has no 'triton' backend"
            in kernels_error({"backend": {"ssd_state_update": "triton"}}))
    assert "kernels.backend: expected str | dict[str, str], got 3" in kernels_error({"backend": 3})
    assert "kernels.strict: expected bool" in kernels_error({"strict": "yes"})


def test_config_request_per_op_and_the_environment_over_it(monkeypatch):
    policy.configure({"selective_scan": "torch", "ssd_scan": "naive"})
    assert dispatch.backend_for("selective_scan", "cpu") == "torch"
    assert dispatch.backend_for("ssd_scan", "cpu") == "naive"
    assert dispatch.backend_for("causal_conv1d", "cpu") == "cpu"  # not named: automatic
    monkeypatch.setenv("MEGAXATL_KERNEL_SELECTIVE_SCAN", "naive")
    policy.changed()
    assert dispatch.backend_for("selective_scan", "cpu") == "naive"
    policy.configure("torch")  # one name: every op that has it
    monkeypatch.delenv("MEGAXATL_KERNEL_SELECTIVE_SCAN")
    policy.changed()
    assert all(dispatch.backend_for(op, "cpu") == "torch" for op in OPS)


def test_start_event_names_each_ops_backend(tmp_path, train_shards):
    data = tiny_config(tmp_path / "run", train_shards, train__steps=1, train__eval_interval=100)
    data["kernels"] = {"backend": {"selective_scan": "torch", "ssd_scan": "cuda"}}  # cuda: not strict, falls back
    with pytest.warns(UserWarning, match="ssd_scan on cpu uses 'cpu', not the requested 'cuda'"):
        res = run(config_from_dict(data))
    assert res.completed
    start = [e for e in events(tmp_path / "run") if e["event"] == "start"]
    assert len(start) == 1
    kernels = start[0]["kernels"]
    assert set(kernels) == set(OPS)
    assert kernels["selective_scan"] == "torch"
    assert kernels["ssd_scan"] == "cpu" and all(kernels[op] == "cpu" for op in OPS if op != "selective_scan")
    why = start[0]["kernel_fallbacks"]
    assert list(why) == ["ssd_scan"] and why["ssd_scan"].startswith("cuda by kernels.backend.ssd_scan: mamba_ssm")


def test_strict_cuda_on_cpu_fails_at_start_up_in_one_line(tmp_path):
    # no data at all: the kernel check comes first, before any input is read or output written
    data = tiny_config(tmp_path / "run", tmp_path / "no_shards")
    data["kernels"] = {"backend": {"selective_scan": "cuda"}, "strict": True}
    with pytest.raises(ConfigError) as e:
        run(config_from_dict(data))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("kernels: kernel backend 'cuda' for 'selective_scan' (requested by "
                                              "kernels.backend.selective_scan, strict) cannot run on cpu here: ")
    assert "mamba_ssm" in msg  # why: what the backend calls does not load
    assert not (tmp_path / "run").exists()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(cfg)], env=clean_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pretrain: config error: {cfg}: kernels: kernel backend 'cuda' for 'selective_scan'")
    assert "cannot run on cpu here: mamba_ssm" in last


def test_info_lists_every_ops_backend_with_a_configs_request(tmp_path):
    from megaxatl.info import run_info

    cfg = tmp_path / "k.json"
    cfg.write_text(json.dumps({"base": str(REPO / "configs" / "tiny_hybrid.json"),
                               "kernels": {"backend": {"selective_scan": "torch"}}}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_info(argparse.Namespace(config=[str(cfg)])) == 0
    text = out.getvalue()
    assert "k.json's kernels section" in text
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.strip().split(" ")[0] in OPS}
    assert set(rows) == set(OPS)
    assert rows["selective_scan"] == "torch" and all(rows[op] == "cpu" for op in OPS if op != "selective_scan")
    assert "selective_scan:cuda, mamba_inner:cuda: mamba_ssm" in text  # why cuda is not usable here
