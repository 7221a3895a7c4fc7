"""Where acornlm keeps downloaded and cached files."""

import os
from collections.abc import Sequence
from pathlib import Path


def cache_dir() -> Path:
    """`$ACORNLM_CACHE`, else `~/.cache/acornlm`; created on first use."""
    root = Path(os.environ.get("ACORNLM_CACHE") or Path.home() / ".cache" / "acornlm")
    root.mkdir(parents=True, exist_ok=True)
    return root


def as_path_list(paths: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """One path, a comma-separated list of paths (`--data a.jsonl,b.jsonl`), or a list of paths, as a list."""
    if isinstance(paths, Path):
        return [paths]
    if isinstance(paths, str):
        return [part.strip() for part in paths.split(",") if part.strip()]
    return list(paths)
