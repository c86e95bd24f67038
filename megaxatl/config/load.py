"""JSON -> typed `Config`, with one clear message for any problem.

Every error names the file, the key path (e.g. `model.mamba.expand`) and the reason; NaN and
Infinity (which Python's JSON reader accepts) are rejected wherever they appear. A config may
start from another with `"base": "other.json"` (a path relative to the file); sections are merged
key by key, so a hybrid variant only states what differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

from megaxatl.config.schema import Config


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, key path and reason."""

    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = source, key, reason
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {reason}" if key else f"{where}{reason}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp`, building nested dataclasses."""
    if isinstance(value, float) and not math.isfinite(value):  # Python's JSON reads NaN / Infinity
        raise ConfigError(source, key, f"must be a finite number, got {json.dumps(value)}")
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, source)
            except ConfigError:
                pass
        raise ConfigError(source, key, f"expected {_type_name(tp)}, got {json.dumps(value)}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(source, key, f"must be one of {_type_name(tp)}, got {json.dumps(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list ({_type_name(tp)}), got {json.dumps(value)}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(source, key, f"expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected an object ({_type_name(tp)}), got {json.dumps(value)}")
        kt, vt = typing.get_args(tp)
        return {_convert(k, kt, key, source): _convert(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {json.dumps(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {json.dumps(value)}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(source, key, f"expected {tp.__name__}, got {json.dumps(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(source, prefix, f"expected an object, got {json.dumps(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        path = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(source, path, f"unknown key (known here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], path, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(source, path, "required key is missing")
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_json(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ConfigError(str(path), "base", "circular 'base' chain")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(str(path), "", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "the top level must be a JSON object")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(str(path), "base", "must be a path string")
        data = _merge(_read_json((path.parent / base).resolve(), seen + (path,)), data)
    return data


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = _build(Config, data, "", source)
    problems = cfg.check()
    if problems:
        key, reason = problems[0]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(source, key, reason + more)
    return cfg


def load_config(path: str | Path) -> Config:
    path = Path(path).resolve()
    return config_from_dict(_read_json(path), str(path))


def config_to_dict(cfg: Config) -> dict:
    """The inverse of config_from_dict (tuples become lists): stored in checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
