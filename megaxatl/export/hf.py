"""A megaxatl model folder <-> a Hugging Face folder that `AutoModelForCausalLM` loads.

Export picks the first stock transformers class that reproduces the model EXACTLY, else ships
plain-PyTorch model code (`remote/`) loaded with `trust_remote_code=True`; which class fits, and
why not, is `archs.py`'s table. Weights go through that class's litgpt-style key table (the donor
families' own tables, donors/keymap.py) in both directions: every tensor must match a rule (an
unknown key is an error naming it), fused tensors (GPT-NeoX's per-head query_key_value, Phi-3's
qkv_proj / gate_up_proj) are joined / split exactly, and nothing is cast, so import gives back the
original tensors bit for bit.

Our embedding and head carry `padded_vocab_size` rows (TP / kernel padding, never predicted);
the exported model has exactly `vocab_size` rows, so its logits have the same shape as ours. The
padding rows travel in `megaxatl_vocab_pad.safetensors` for the way back, and the original
meta.json (config, step, transfer report) in `megaxatl_export.json`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megaxatl.config import ModelConfig, config_from_dict, config_to_dict
from megaxatl.donors.keymap import Dims, KeyMapError, resolve, to_original
from megaxatl.export.archs import ARCH_NAMES, ARCHS, Arch, arch_named
from megaxatl.fsutil import atomic_dir, check_output

FORMAT = "megaxatl-hf-export"
VERSION = 1
SIDECAR = "megaxatl_export.json"
PAD_FILE = "megaxatl_vocab_pad.safetensors"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HEAD_ROWS = ("embed.weight", "lm_head.weight")
# files of a model folder that are never tokenizer files (a transfer may have copied a whole donor
# folder as tokenizer/): these must not land on top of the export's own files
_NOT_TOKENIZER = re.compile(r"(config\.json|generation_config\.json|meta\.json|report\.json|README\.md|"
                            r".*\.(safetensors|bin|pt|pth|gguf|py|index\.json))")


class ExportError(ValueError):
    """A model or folder that cannot be exported / imported faithfully; the message names it."""


class _TensorDict:
    """In-memory tensors in the store interface keymap.resolve reads."""

    def __init__(self, tensors: dict[str, torch.Tensor], file: Path):
        self._t, self._file = tensors, file

    def keys(self):
        return list(self._t)

    def file_of(self, key):
        return self._file

    def shape(self, key):
        return tuple(self._t[key].shape)

    def dtype(self, key):
        return self._t[key].dtype


def to_hf_keys(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: Arch, facts: dict,
               what: str) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors through the class's key table; every tensor must have a rule."""
    try:
        return to_original(arch.keymap(facts), state, Dims.of(cfg), cfg.n_layers, what)
    except KeyMapError as e:
        raise ExportError(str(e)) from None


def from_hf_keys(tensors: dict[str, torch.Tensor], cfg: ModelConfig, arch: Arch, facts: dict,
                 where: Path) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (the same table the other way); an unknown key is an error naming it."""
    from megaxatl.donors import DonorError

    V = cfg.vocab_size
    expected = {k: ((V,) + s[1:] if k in HEAD_ROWS else s) for k, s in facts["shapes"].items()}
    try:
        entries, _ = resolve(arch.keymap(facts), Dims.of(cfg), _TensorDict(tensors, where), str(where),
                             n_layers=cfg.n_layers, expected=expected, tie_embeddings=cfg.tie_embeddings,
                             family=arch.hf_class)
    except DonorError as e:
        raise ExportError(str(e)) from None
    out = {}
    for name, e in entries.items():
        t = e.op.fn(tensors[e.source], Dims.of(cfg))
        out[name] = t if t is tensors[e.source] else t.clone(memory_format=torch.contiguous_format)
    return out


def model_facts(cfg: ModelConfig) -> dict:
    """What the built model knows beyond its config section (built on the meta device: no memory)."""
    from megaxatl.models import build
    from megaxatl.models.mamba2 import Mamba2

    with torch.device("meta"):
        model = build(cfg)
    eps = {m.norm.eps for m in model.modules() if isinstance(m, Mamba2)}
    if len(eps) > 1:
        raise ExportError(f"Mamba-2 layers use different gated-norm eps {sorted(eps)}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {"mamba2_norm_eps": eps.pop() if eps else None, "shapes": shapes}


def choose_arch(cfg: ModelConfig, facts: dict, name: str = "auto") -> Arch:
    """The first exact stock match (or the named one, which must fit), else remote code."""
    if name == "auto":
        return next(a for a in ARCHS if not a.fits(cfg, facts))
    arch = arch_named(name)
    if arch is None:
        raise ExportError(f"unknown architecture {name!r}; known: auto, {', '.join(ARCH_NAMES)}")
    reasons = arch.fits(cfg, facts)
    if reasons:
        raise ExportError(f"{arch.hf_class} does not reproduce this model exactly: {'; '.join(reasons)}")
    return arch


def fit_table(cfg: ModelConfig, facts: dict) -> list[tuple[str, str]]:
    """(class, 'exact match' or why not) for every architecture, in selection order."""
    return [(a.hf_class, "; ".join(a.fits(cfg, facts)) or "exact match") for a in ARCHS]


# ---- files -----------------------------------------------------------------------------------

def _tokenizer_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not _NOT_TOKENIZER.fullmatch(p.name)
                  and p.name not in (SIDECAR, PAD_FILE))


def _special_token_ids(tok_dir: Path | None) -> dict:
    """bos / eos / pad ids of the tokenizer for the HF config; unknown ones are None, never a
    class default that would name some other token."""
    ids = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    if tok_dir is None:
        return ids
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception:  # the files are still copied; only the ids in config.json stay unset
        return ids
    return {k: getattr(tok, k, None) for k in ids}


def _write_hf_config(arch: Arch, kwargs: dict, tmp: Path) -> None:
    if arch.remote:
        from megaxatl.export.remote.configuration_megaxatl import MegaxatlConfig as cls
    else:
        from transformers import AutoConfig

        cls = type(AutoConfig.for_model(arch.model_type))
    try:
        config = cls(**kwargs)
    except (ValueError, TypeError) as e:  # the class's own validation: a fits() gap, never silent
        raise ExportError(f"{arch.hf_class}: its config rejects this model ({e})") from None
    config.architectures = [arch.hf_class]
    config.save_pretrained(str(tmp))


def _readme(arch: Arch, model_dir: Path, cfg: ModelConfig) -> str:
    load = ("AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)" if arch.remote
            else "AutoModelForCausalLM.from_pretrained(folder)")
    lines = [
        f"# {model_dir.name} ({arch.hf_class})", "",
        f"Exported by `megaxatl export-hf` from the megaxatl model folder `{model_dir}`.", "",
        f"- layer pattern: `{cfg.pattern}` ({cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size})",
        f"- load with `{load}`",
        "- `megaxatl import-hf --hf FOLDER --out DIR` gives back the original model folder (bit-identical "
        f"weights, using `{SIDECAR}` and, when the vocabulary was padded, `{PAD_FILE}`)",
    ]
    if arch.remote:
        lines += [
            "",
            "No stock transformers class reproduces this layout exactly, so the folder ships its model code:",
            "`configuration_megaxatl.py` and `modeling_megaxatl.py` (self-contained: torch and transformers only,",
            "megaxatl is not needed to load it). The scans are the sequential reference recurrences;",
            "`generate` carries each layer's recurrent state (and the attention layers' KV cache) between",
            "steps, so a new token costs one step per layer. Left-padded batches (batched generation) and",
            "right-padded ones (scoring) give each row's unpadded result: padding enters no state; a gap",
            "between real tokens is refused. Import the folder back into megaxatl for fast (fused) kernels.",
        ]
    return "\n".join(lines) + "\n"


def export_hf(model_dir: str | Path, out: str | Path, overwrite: bool = False, arch: str = "auto") -> Arch:
    """Write `out`, a Hugging Face folder of the megaxatl model folder `model_dir`. Atomic."""
    from megaxatl.checkpoint import load_model_dir

    model_dir, out = Path(model_dir), Path(out)
    _check_out(model_dir, out, overwrite, _is_export, _EXPORT)
    state, meta = load_model_dir(model_dir)
    cfg = config_from_dict(meta.get("config", {}), str(model_dir / "meta.json")).model
    facts = model_facts(cfg)
    _check_state(state, facts["shapes"], str(model_dir / WEIGHTS))
    chosen = choose_arch(cfg, facts, arch)
    V = cfg.vocab_size
    pad = {k: state[k][V:].contiguous() for k in HEAD_ROWS if k in state and state[k].shape[0] > V}
    body = {k: (v[:V] if k in HEAD_ROWS else v).contiguous() for k, v in state.items()}
    tensors = to_hf_keys(body, cfg, chosen, facts, f"{model_dir} -> {chosen.hf_class}")
    tok_dir = model_dir / "tokenizer"
    tok_dir = tok_dir if tok_dir.is_dir() else None
    tok_files = _tokenizer_files(tok_dir) if tok_dir else []
    dtype = str(state["embed.weight"].dtype).removeprefix("torch.")
    kwargs = chosen.hf_config(cfg, facts) | _special_token_ids(tok_dir) | {"dtype": dtype}
    sidecar = {"format": FORMAT, "version": VERSION, "arch": chosen.name, "hf_class": chosen.hf_class,
               "tokenizer_files": [p.name for p in tok_files],
               "meta": {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")}}
    with atomic_dir(out, overwrite, replaceable=_is_export, kind=_EXPORT) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if pad:
            save_file(pad, str(tmp / PAD_FILE), metadata={"format": "pt"})
        _write_hf_config(chosen, kwargs, tmp)
        if chosen.remote:
            from megaxatl.export.remote import FILES, template_dir

            for name in FILES:
                shutil.copyfile(template_dir() / name, tmp / name)
        for p in tok_files:
            shutil.copyfile(p, tmp / p.name)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(chosen, model_dir, cfg))
    return chosen


def _is_export(path: Path) -> bool:
    """An earlier export-hf output: what `export-hf --overwrite` may replace."""
    return (path / SIDECAR).is_file()


_EXPORT = f"an export-hf folder ({SIDECAR})"


def _check_out(src: Path, out: Path, overwrite: bool, replaceable, kind: str) -> None:
    # an --overwrite onto the source, or onto a folder holding it, would delete the input
    check_output(out, inputs=[src], overwrite=overwrite, replaceable=replaceable, kind=kind, error=ExportError)


# ---- import ----------------------------------------------------------------------------------

def _check_state(state: dict[str, torch.Tensor], shapes: dict[str, tuple], where: str) -> None:
    missing = [k for k in shapes if k not in state]
    extra = [k for k in state if k not in shapes]
    if missing or extra:
        raise ExportError(f"{where}: does not fit its config (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, shape in shapes.items():
        if tuple(state[k].shape) != shape:
            raise ExportError(f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, the config implies {shape}")
        if not state[k].is_floating_point():
            raise ExportError(f"{where}: tensor {k!r} has dtype {state[k].dtype}, expected floating point")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable ({e})") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards a `model.safetensors.index.json` names."""
    if (folder / WEIGHTS).is_file():
        return _read_safetensors(folder / WEIGHTS)
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        raise ExportError(f"{folder}: no {WEIGHTS} (or {WEIGHTS_INDEX})")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{index}: not a safetensors index ({e})") from None
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise ExportError(f"{index}: shard name {shard!r} is not a plain file name")
        out.update(_read_safetensors(folder / shard))
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except ValueError as e:
        raise ExportError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: not a JSON object")
    return data


def import_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> str:
    """Write the megaxatl model folder `out` from the HF folder `hf_dir`; returns the source class.

    A folder written by `export_hf` comes back exactly (weights, meta, tokenizer). Other stock
    Llama / Qwen2 / Mistral / GPT-NeoX folders are read with the donor readers as an all-attention
    model (the same config a transfer would use for the donor itself)."""
    from megaxatl.checkpoint import save_model_dir

    hf_dir = Path(hf_dir)
    from megaxatl.checkpoint.model_dir import MODEL_FOLDER, is_model_dir

    _check_out(hf_dir, Path(out), overwrite, is_model_dir, MODEL_FOLDER)
    if not hf_dir.is_dir():
        raise ExportError(f"{hf_dir}: not a folder")
    hf_config = _read_json(hf_dir / "config.json")
    if not (hf_dir / SIDECAR).is_file():
        return _import_foreign(hf_dir, out, overwrite)
    sidecar = _read_json(hf_dir / SIDECAR)
    if sidecar.get("format") != FORMAT or sidecar.get("version") != VERSION:
        raise ExportError(f"{hf_dir / SIDECAR}: format {sidecar.get('format')!r} version {sidecar.get('version')!r}, "
                          f"expected {FORMAT!r} version {VERSION}")
    arch = arch_named(sidecar.get("arch"))
    if arch is None:
        raise ExportError(f"{hf_dir / SIDECAR}: unknown arch {sidecar.get('arch')!r}")
    if hf_config.get("model_type") != arch.model_type:
        raise ExportError(f"{hf_dir / 'config.json'}: model_type {hf_config.get('model_type')!r} does not match "
                          f"the export's {arch.model_type!r}")
    meta = sidecar.get("meta") or {}
    cfg = config_from_dict(meta.get("config", {}), f"{hf_dir / SIDECAR}: meta.config").model
    facts = model_facts(cfg)
    state = from_hf_keys(read_hf_weights(hf_dir), cfg, arch, facts, hf_dir)
    if (hf_dir / PAD_FILE).is_file():
        for k, rows in _read_safetensors(hf_dir / PAD_FILE).items():
            if k not in state or rows.dtype != state[k].dtype:
                raise ExportError(f"{hf_dir / PAD_FILE}: padding rows {k!r} do not fit the weights")
            state[k] = torch.cat([state[k], rows])
    _check_state(state, facts["shapes"], str(hf_dir))
    with tempfile.TemporaryDirectory() as tok_tmp:
        tok_dir = _collect_tokenizer(hf_dir, sidecar.get("tokenizer_files", []), Path(tok_tmp))
        save_model_dir(out, state, meta, tokenizer_dir=tok_dir, overwrite=overwrite)
    return arch.hf_class


def _collect_tokenizer(hf_dir: Path, names: list[str], tmp: Path) -> Path | None:
    if not names:
        return None
    tok = tmp / "tokenizer"
    tok.mkdir()
    for name in names:
        src = hf_dir / name
        if Path(name).name != name or not src.is_file():
            raise ExportError(f"{hf_dir / SIDECAR}: tokenizer file {name!r} is missing from the folder")
        shutil.copyfile(src, tok / name)
    return tok


def _import_foreign(hf_dir: Path, out: str | Path, overwrite: bool) -> str:
    from megaxatl.checkpoint import save_model_dir
    from megaxatl.donors import DonorError, open_donor
    from megaxatl.transfer.api import model_dict_from_donor

    try:
        donor = open_donor(hf_dir)
    except DonorError as e:
        raise ExportError(f"not a megaxatl export (no {SIDECAR}) and not a readable stock model: {e}") from None
    with donor:
        spec = donor.spec
        cfg_dict = {"model": model_dict_from_donor(spec, "*" * spec.n_layers)}
        config = config_from_dict(cfg_dict, f"{hf_dir / 'config.json'}")
        state = donor.state_dict()
        facts = model_facts(config.model)
        _check_state(state, facts["shapes"], str(hf_dir))
        meta = {"config": config_to_dict(config), "step": 0, "source": f"megaxatl import-hf {hf_dir}"}
        with tempfile.TemporaryDirectory() as tok_tmp:
            names = [p.name for p in _tokenizer_files(hf_dir)]
            tok_dir = _collect_tokenizer(hf_dir, names, Path(tok_tmp)) if donor.tokenizer_dir else None
            save_model_dir(out, state, meta, tokenizer_dir=tok_dir, overwrite=overwrite)
    return f"{spec.family} (stock)"
