"""`--set section.key=value` overrides applied to a config file before validation.

Values are JSON when they parse as JSON (numbers, true/false, null, lists, quoted strings) and
plain strings otherwise, so `--set train.out_dir=runs/a` and `--set train.betas=[0.9,0.99]` both
work. An unknown key is reported by the normal validation with its full path.
"""

from __future__ import annotations

import json
from pathlib import Path

from megaxatl.config import Config, ConfigError, config_from_dict, config_to_dict, load_config


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str], source: str = "") -> dict:
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(source, "", f"--set {item!r}: expected section.key=value")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(source, ".".join(parts[: i + 1]), f"--set {key}: is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return data


def load_with_overrides(path: str | Path, overrides: list[str] | None = None) -> Config:
    """load_config(path) with `overrides` applied; errors name the file and the key."""
    cfg = load_config(path)
    if not overrides:
        return cfg
    source = f"{Path(path).resolve()} (with --set)"
    return config_from_dict(apply_overrides(config_to_dict(cfg), overrides, source), source)
