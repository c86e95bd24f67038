"""`megaxatl info`: versions, what is usable on this machine, kernel backends, config sizes."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import warnings
from pathlib import Path


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _usable(module: str, probe) -> str:
    try:
        with warnings.catch_warnings():  # megatron-core warns about optional Apex / TE at import
            warnings.simplefilter("ignore")
            mod = importlib.import_module(module)
        detail = probe(mod)
        return f"yes{f' ({detail})' if detail else ''}"
    except Exception as e:  # report, never crash: this command is how people debug installs
        return f"no ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def _deepspeed_probe(mod) -> str:
    from megaxatl.train.deepspeed_internals import check_version

    check_version()  # the trainer's own gate: a version outside the checked range is not usable
    return mod.get_accelerator().device_name()


def shipped_configs() -> list[Path]:
    """configs/*.json beside the package (a source checkout) or in the working directory."""
    here = Path(__file__).resolve().parent.parent / "configs"
    for d in (here, Path.cwd() / "configs"):
        if d.is_dir():
            return sorted(d.glob("*.json"))
    return []


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def config_rows(paths: list[Path]) -> list[tuple[str, str, str, str]]:
    from megaxatl.config import ConfigError, load_config
    from megaxatl.models import count_parameters

    rows = []
    for p in paths:
        try:
            cfg = load_config(p)
        except ConfigError as e:
            rows.append((p.name, "-", "-", f"invalid: {e.reason}"))
            continue
        m = cfg.model
        rows.append((p.name, human(count_parameters(cfg)), m.pattern if len(m.pattern) <= 32 else m.pattern[:29] + "...",
                     f"{m.n_layers} x {m.d_model}"))
    return rows


def print_kernels(config: Path | None) -> None:
    """Every kernel op's backend on CPU and on CUDA as dispatch would pick it now (the environment's
    MEGAXATL_KERNEL* and, with one --config, that config's `kernels` section), then why each
    backend that cannot run here does not."""
    from megaxatl.kernels.dispatch import describe_backends

    where = "environment"
    if config is not None:
        from megaxatl.config import ConfigError, load_config

        try:
            load_config(config).kernels.apply()
            where = f"{config.name}'s kernels section and the environment"
        except ConfigError as e:
            print(f"kernel backends: {config.name} not applied ({e.reason})")
    with warnings.catch_warnings():  # a fallback's warning: the table says it
        warnings.simplefilter("ignore")
        rows = describe_backends()
    print(f"kernel backends, as chosen now ({where}): op, on CPU / on CUDA (usable here):")
    for op, d in rows.items():
        print(f"  {op:<24} {d['chosen_cpu']:<8} / {d['chosen_cuda']:<8} ({', '.join(d['available'])})")
    missing = {why: [] for d in rows.values() for why in d["unavailable"].values()}
    for op, d in rows.items():
        for name, why in d["unavailable"].items():
            missing[why].append(f"{op}:{name}")
    if missing:
        print("not usable here:")
        for why, which in missing.items():
            print(f"  {', '.join(which)}: {why}")


def run_info(args) -> int:
    import torch

    print(f"megaxatl {_version('megaxatl')}  python {platform.python_version()}  torch {torch.__version__}")
    for dist in ("deepspeed", "megatron-core", "webdataset", "transformers", "triton", "mamba-ssm", "causal-conv1d", "fla-core", "lm-eval"):
        print(f"  {dist:<14} {_version(dist)}")
    print("usable:")
    cuda = torch.cuda.is_available()
    print(f"  CUDA           {'yes (' + torch.cuda.get_device_name(0) + ')' if cuda else 'no'}")
    print(f"  DeepSpeed      {_usable('deepspeed', _deepspeed_probe)}")
    print(f"  megatron-core  {_usable('megatron.core.tensor_parallel', lambda m: '')} (TP collectives)")
    print(f"  webdataset     {_usable('webdataset', lambda m: '')} (data.access: stream)")
    paths = [Path(c) for c in args.config] if args.config else shipped_configs()
    print_kernels(paths[0] if args.config and len(paths) == 1 else None)
    if paths:
        print("configs (parameters, pattern, layers x width):")
        for name, n, pattern, shape in config_rows(paths):
            print(f"  {name:<34} {n:>8}  {shape:<12} {pattern}")
    return 0


def add_info_args(parser) -> None:
    parser.add_argument("--config", action="append", help="a config to size (repeatable); default: all shipped configs")
