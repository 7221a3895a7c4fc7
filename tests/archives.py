"""A .tar.gz written from a {name: bytes} table: the fake downloads of the corpus tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
