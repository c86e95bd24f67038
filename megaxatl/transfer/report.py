"""The transfer report: what was copied from where, what is fresh and how it was initialised.

Counts are in elements, so copied + fresh == the model's parameter count (a tied head counts once).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from megaxatl.transfer.plan import Plan, copied_numel

_FRESH_INIT = {
    "A_log": "S4D-real A = -(1..N) (Mamba-1) / log U(1, 16) per head (Mamba-2)",
    "D": "ones",
    "dt_bias": "softplus^-1 of log-uniform dt in [dt_min, dt_max]",
    "dt_proj.bias": "softplus^-1 of log-uniform dt in [dt_min, dt_max]",
    "dt_proj.weight": "U(-dt_rank^-0.5, dt_rank^-0.5)",
    "conv1d.weight": "PyTorch Conv1d default (kaiming uniform)",
    "conv1d.bias": "PyTorch Conv1d default",
    "norm.weight": "ones",
    "bias": "zeros",
}


def fresh_init(name: str, init_std: float, n_layers: int) -> str:
    for suffix, desc in _FRESH_INIT.items():
        if name.endswith(suffix):
            return desc
    if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
        return f"N(0, {init_std}/sqrt(2*{n_layers}))"
    return f"N(0, {init_std})"


def component_of(name: str) -> str:
    if name.startswith("embed"):
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if ".norm1." in name or ".norm2." in name or name.startswith("norm_f"):
        return "norm"
    if ".mlp." in name:
        return "mlp"
    return "mixer"


@dataclass
class TransferReport:
    donor: str
    family: str
    mode: str
    layer_map: list[int]
    pattern: str
    params: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # the donor's tokenizer files, carried into the transfer output
    tokenizer_dir: str | None = None
    # transfer.keep_attention: the measured per-layer costs and the chosen layers (select.py)
    selection: dict | None = None
    selection_table: str | None = None

    # ---- summaries ------------------------------------------------------------------
    @property
    def transferred(self) -> list[str]:
        """Parameters the freeze policy holds: wholly copied, or copied but for padded vocab rows."""
        return [p["target"] for p in self.params if p["copied"] and (not p["fresh"] or p["component"] in ("embedding", "head"))]

    def totals(self) -> dict:
        by = defaultdict(lambda: {"copied": 0, "fresh": 0})
        for p in self.params:
            comp = p["component"]
            by[comp]["copied"] += p["copied"]
            by[comp]["fresh"] += p["fresh"]
        copied = sum(v["copied"] for v in by.values())
        fresh = sum(v["fresh"] for v in by.values())
        return {"by_component": dict(by), "copied": copied, "fresh": fresh, "total": copied + fresh}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["totals"] = self.totals()
        d["transferred"] = self.transferred
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        t = self.totals()
        lines = [f"XATL transfer  donor: {self.donor} ({self.family})  mode: {self.mode}",
                 f"pattern: {self.pattern}",
                 f"layer map (target <- donor): {', '.join(f'{i}<-{j}' for i, j in enumerate(self.layer_map))}",
                 f"{'component':<12}{'copied':>14}{'fresh':>14}"]
        for comp, v in sorted(t["by_component"].items()):
            lines.append(f"{comp:<12}{v['copied']:>14,}{v['fresh']:>14,}")
        pct = 100 * t["copied"] / max(1, t["total"])
        lines.append(f"{'total':<12}{t['copied']:>14,}{t['fresh']:>14,}   ({pct:.1f}% of {t['total']:,} copied)")
        lines.append(f"donor tensors dropped: {len(self.dropped)}" + (
            "" if not self.dropped else " (" + "; ".join(sorted({d['reason'] for d in self.dropped})) + ")"))
        lines += [f"warning: {w}" for w in self.warnings]
        if self.selection_table:
            lines.append(self.selection_table)
        return "\n".join(lines)


def build_report(plan: Plan, donor, target_shapes: dict, donor_name: str, pattern: str,
                 init_std: float, n_layers: int) -> TransferReport:
    rep = TransferReport(donor_name, donor.spec.family, plan.mode, plan.layer_map, pattern, warnings=list(plan.warnings))
    by_target: dict[str, list] = defaultdict(list)
    for c in plan.copies:
        by_target[c.target].append(c)
    for name, shape in target_shapes.items():
        numel = 1
        for s in shape:
            numel *= s
        copies = by_target.get(name, [])
        copied = sum(copied_numel(c, target_shapes) for c in copies)
        entry = {
            "target": name, "shape": list(shape), "status": "COPIED" if copied else "FRESH",
            "component": copies[0].component if copies else component_of(name),
            "copied": copied, "fresh": numel - copied,
            "source": [c.source for c in copies], "donor_key": [donor.source(c.source) for c in copies],
            "note": "; ".join(n for n in (c.note for c in copies) if n),
            "init": fresh_init(name, init_std, n_layers) if copied < numel else "",
        }
        if copied and copied < numel and not entry["note"]:
            entry["note"] = f"{copied} of {numel} elements copied (padded vocabulary rows fresh)"
        rep.params.append(entry)
    for key, reason in plan.dropped.items():
        shape = donor.shape(key)
        numel = 1
        for s in shape:
            numel *= s
        rep.dropped.append({"source": key, "donor_key": donor.source(key), "numel": numel, "reason": reason})
    # tensors of the donor file that have no canonical name at all (rotary caches, attention masks)
    for key, reason in donor.dropped.items():
        rep.dropped.append({"source": None, "donor_key": key, "numel": None, "reason": reason})
    return rep
