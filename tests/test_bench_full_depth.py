"""benchmarks/xatl_full_depth.py's report arithmetic (the benchmark itself needs the real donor and
minutes per arm; its --quick run is recorded in benchmarks/README.md)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("xatl_full_depth", ROOT / "benchmarks" / "xatl_full_depth.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_fields_from_curves():
    b = _bench()
    curve = lambda pts: [{"step": s, "val_loss": l, "val_bpb": p} for s, l, p in pts]  # noqa: E731
    arms = {"scratch": {"curve": curve([(0, 10.0, 4.0), (2, 6.0, 3.0), (4, 5.0, 2.5)])},
            "xatl": {"curve": curve([(0, 8.0, 3.0), (2, 4.0, 1.5), (4, 3.0, 1.2)])}}
    b.summarize(arms, donor_bpb=1.0, tokens_per_step=100)
    x, s = arms["xatl"], arms["scratch"]
    assert x["final_val_bpb"] == 1.2 and abs(x["gap_to_donor_bpb"] - 0.2) < 1e-12
    # scratch's final 5.0: xatl passes it between step 0 (8.0) and 2 (4.0): at 1.5 steps = 150 tokens
    assert abs(x["tokens_to_scratch_final"] - 150) < 1e-9 and s["tokens_to_scratch_final"] == 400
    # within 10% of the donor (1.1 bits/byte): never (1.2 at the end)
    assert x["tokens_to_donor_10pct"] is None
    assert b.FIXED["50"] == list(range(1, 30, 2)) and len(b.FIXED["75"]) == b.KEEP["75"] == 8
