"""Where acornlm keeps downloaded and cached files."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$ACORNLM_CACHE`, else `~/.cache/acornlm`; created on first use."""
    root = Path(os.environ.get("ACORNLM_CACHE") or Path.home() / ".cache" / "acornlm")
    root.mkdir(parents=True, exist_ok=True)
    return root
