"""Checkpoint files: the model half (config + safetensors weights + tokenizer), shared by training,
generation, serving and export.

A checkpoint is a directory:

    config.json            {"format": "acornlm", "model": {...ModelConfig...}, ...run info...}
    model.safetensors      weights (a tied output head is stored once, as in transformers)
    tokenizer.json         + tokenizer_config.json (the tokenizer the model was trained with)
    train_state.pt         optimizer, schedule, RNG and data position (training only; see acornlm.train)

Weights load only through safetensors, so opening a checkpoint can never execute code.
A run directory holds `checkpoints/step-NNNNNNN/` folders and a `checkpoints/latest` pointer file;
every function here accepts either a checkpoint directory or a run directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from acornlm.errors import CheckpointError, ConfigError
from acornlm.model import ModelConfig, Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
LATEST_FILE = "latest"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir or a `checkpoints/` dir (via `latest`)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).exists():
        return path
    for folder in (path / "checkpoints", path):
        pointer = folder / LATEST_FILE
        if pointer.is_file():
            target = folder / pointer.read_text(encoding="utf-8").strip()
            if (target / CONFIG_FILE).is_file():
                return target
            raise CheckpointError(f"{pointer} points to {target}, which holds no {CONFIG_FILE}")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(
        f"{path} is not a checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE}, or checkpoints/{LATEST_FILE}"
    )


def read_checkpoint_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint, with a clear error when missing or corrupt."""
    file = Path(ckpt_dir) / CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is corrupt: {exc}") from exc
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{file} is not an acornlm checkpoint config (no `model` section)")
    return data


def model_state_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict without the tied output head (stored once, as transformers does)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_model_files(directory: Path, model: Transformer, info: dict[str, Any] | None = None,
                      tokenizer_dir: str | Path | None = None) -> None:
    """Write config.json, model.safetensors and the tokenizer files into `directory` (which must exist).

    Callers that need atomicity write into a temporary directory and rename it (see acornlm.train).
    """
    config = {"format": "acornlm", "version": 1, "model": model.config.to_dict(), **(info or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(model_state_for_saving(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, directory / name)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, dict[str, Any]]:
    """Build the model of a checkpoint and load its safetensors weights; returns (model, config.json)."""
    ckpt = resolve_checkpoint(path)
    info = read_checkpoint_config(ckpt)
    try:
        config = ModelConfig.from_dict(info["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: invalid model section: {exc}") from exc
    weights = ckpt / WEIGHTS_FILE
    try:
        state = load_file(str(weights), device=str(device))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{weights} is missing") from exc
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {exc}") from exc
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    model.init_rope()  # derived buffers are not in the file
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model, info


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
