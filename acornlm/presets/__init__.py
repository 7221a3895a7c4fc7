"""Named presets: small YAML files with a `model:` section and an optional `train:` section.

`--config NAME` loads a whole preset; `--model NAME` takes only its model section.
Presets are data, not code: add a YAML file here to add one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from acornlm.errors import ConfigError

PRESET_DIR = Path(__file__).parent


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path | None:
    """The YAML file of a preset name, or None when `name` is not a preset."""
    path = PRESET_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Read a preset by name, or any YAML config file by path."""
    path = preset_path(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"no preset or config file named {name_or_path!r}; presets: {', '.join(list_presets())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with `model:` and `train:` sections")
    return data
