"""The final table of benchmarks/gpu_check.sh, from its results.jsonl (one JSON row per case).

    python benchmarks/gpu_summary.py OUT/results.jsonl

Columns: section, case, backend, dtype, status, max abs error vs naive / the rel-RMS tolerance
(rel_rms <= tol is PASS), and the case's numbers (bandwidth ratio, MFU, memory, reasons). Exit 1
when any row FAILs, 0 otherwise (NOT CHECKED rows are listed and counted, not failures: the
summary line says how many cases were not checked, so a partial run cannot read as complete).
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> int:
    rows = []
    for line in open(path):
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"section": "?", "case": line[:60], "status": "FAIL", "note": "unreadable result row"})
    print(f"{'section':<12} {'case':<36} {'backend':<16} {'dtype':<6} {'status':<12} {'max_abs / rel_rms / tol':<28} numbers")
    for r in rows:
        err = (f"{r['max_abs']:.2e} / {r['rel_rms']:.1e} / {r['tol']:g}" if "rel_rms" in r else "")
        print(f"{r.get('section', '?'):<12} {str(r.get('case', '?'))[:36]:<36} {str(r.get('backend', '-'))[:16]:<16} "
              f"{r.get('dtype', '-'):<6} {r.get('status', '?'):<12} {err:<28} {r.get('note', '')}")
    count = {s: sum(r.get("status") == s for r in rows) for s in ("PASS", "FAIL", "NOT CHECKED")}
    print(f"\n{count['PASS']} passed, {count['FAIL']} failed, {count['NOT CHECKED']} not checked, "
          f"{len(rows) - sum(count.values())} other (measurements, builds) of {len(rows)} rows")
    return 1 if count["FAIL"] or not rows else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
