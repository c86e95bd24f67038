"""The transfer output written tensor by tensor: no target model is built.

`TransferSource` is a TensorSource (checkpoint/sharded.py) over the target's parameters in model
order: each is its fresh layout-free init (models.lm.build_unit, one unit held at a time) with
the plan's donor copies written into it, in the requested dtype. The writers of the sharded
model folder (DCP at any tp x pp) and of the single-file model folder read it one tensor at a
time, so memory holds one unit plus one donor tensor, never the whole target in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaxatl.config import config_to_dict


class TransferSource:
    def __init__(self, donor, plan, cfg, dtype: torch.dtype, seed: int, shapes: dict):
        self.donor, self.cfg, self.dtype, self.seed = donor, cfg, dtype, seed
        self._entries = {k: (tuple(s), dtype) for k, s in shapes.items()}
        self._copies: dict[str, list] = {}
        for c in plan.copies:
            self._copies.setdefault(c.target, []).append(c)
        self._unit, self._ref = None, {}

    def entries(self) -> dict:
        return dict(self._entries)

    @torch.no_grad()
    def read(self, key: str) -> torch.Tensor:
        from megaxatl.models.lm import build_unit, unit_of

        unit = unit_of(key)
        if unit != self._unit or key[len(unit) + 1:] not in self._ref:  # keys in model order: one unit at a time
            self._ref = dict(build_unit(self.cfg, unit, self.seed).named_parameters())
            self._unit = unit
        t = self._ref.pop(key[len(unit) + 1:]).detach().to(self.dtype)
        self.write_copies(key, t)
        return t

    @torch.no_grad()
    def write_copies(self, key: str, t: torch.Tensor) -> None:
        """The plan's donor copies into target tensor `key` (whole, in place)."""
        for c in self._copies.get(key, []):
            src = self.donor.get(c.source)
            if c.transform is not None:
                src = c.transform(src)
            (t[c.index] if c.index else t).copy_(src.to(t.dtype))


def open_transfer(donor_path, cfg, *, mode: str | None = None, layer_map: list[int] | None = None,
                  dtype: torch.dtype = torch.float32, seed: int | None = None):
    """Plan and check the transfer of `donor_path` into `cfg`'s model, reading headers only.
    -> (TransferSource, TransferReport); the donor tensors are read by source.read, one target
    tensor at a time. Values are from_donor's (the layout-free init plus the plan's copies)."""
    from megaxatl.assets.donors import resolve_donor
    from megaxatl.donors import open_donor
    from megaxatl.models import build
    from megaxatl.transfer.plan import check_shapes, make_plan
    from megaxatl.transfer.report import build_report

    mode = mode or cfg.transfer.mode
    layer_map = layer_map if layer_map is not None else cfg.transfer.layer_map
    donor = open_donor(resolve_donor(str(donor_path)))
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in build(cfg).named_parameters()}
    plan = make_plan(donor.spec, cfg.model, shapes, donor.keys(), mode, layer_map)
    check_shapes(plan, shapes, donor.shape)
    report = build_report(plan, donor, shapes, str(donor_path), cfg.model.pattern, cfg.model.init_std,
                          cfg.model.n_layers)
    report.tokenizer_dir = str(donor.tokenizer_dir) if donor.tokenizer_dir else None
    source = TransferSource(donor, plan, cfg, dtype, cfg.train.seed if seed is None else seed, shapes)
    return source, report


def transfer_to_folder(donor_path, cfg, out: str | Path, *, mode: str | None = None,
                       layer_map: list[int] | None = None, dtype: torch.dtype = torch.float32,
                       seed: int | None = None, tp: int = 1, pp: int = 1, fmt: str = "sharded",
                       overwrite: bool = False):
    """Plan, check, and write the transfer output. fmt "sharded": a sharded model folder (DCP files
    at tp x pp, shards.json); "model-dir": one model.safetensors. -> the TransferReport."""
    from megaxatl.checkpoint.reshard import WEIGHTS_OUTPUT, is_weights_output, save_model_dir_streaming
    from megaxatl.checkpoint.sharded import check_layout, save_sharded_dir

    if fmt not in ("sharded", "model-dir"):
        raise ValueError(f"--format must be 'sharded' or 'model-dir', got {fmt!r}")
    layout = check_layout(cfg.model, tp, pp) if fmt == "sharded" else check_layout(cfg.model, 1, 1)
    source, report = open_transfer(donor_path, cfg, mode=mode, layer_map=layer_map, dtype=dtype, seed=seed)
    config = config_to_dict(cfg)
    meta = {"step": 0, "transferred": report.transferred, "report": report.to_dict(), "source": "megaxatl transfer"}
    extra = {"report.json": report.to_json()}
    kinds = dict(replaceable=is_weights_output, kind=WEIGHTS_OUTPUT)  # --overwrite: an earlier output of either format
    if fmt == "sharded":
        save_sharded_dir(out, source, layout, config, meta, report.tokenizer_dir, overwrite, extra_files=extra, **kinds)
    else:
        save_model_dir_streaming(out, source, config, meta, report.tokenizer_dir, overwrite, extra_files=extra, **kinds)
    return report
