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
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from acornlm.errors import CheckpointError, ConfigError
from acornlm.model.config import ModelConfig
from acornlm.model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
LATEST_FILE = "latest"
MAX_CONFIG_BYTES = 16 * 2**20  # real config.json files are a few KB; this bounds what a bad one costs


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


def read_json_config(file: Path, missing_hint: str = "") -> dict[str, Any]:
    """A config.json parsed as a JSON object, or a CheckpointError naming the file.

    The one reader of model config files (acornlm checkpoints and Hugging Face folders alike):
    such a file is input, so its size is bounded before it is read, and nesting too deep for
    the parser (RecursionError) or integers too long to convert give the same clear error as
    plain bad JSON. `missing_hint` is appended to the "is missing" message.
    """
    try:
        size = file.stat().st_size
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing{missing_hint}") from exc
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read: {exc}") from exc
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{file} is {size:,} bytes; a config.json is a few KB (at most "
                              f"{MAX_CONFIG_BYTES:,} accepted), so this one is corrupt or not a config")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{file} is not UTF-8 text (byte offset {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is corrupt: line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{file} is corrupt: its JSON is nested too deeply to be a config") from exc
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise CheckpointError(f"{file} is corrupt: {exc}") from exc
    except OSError as exc:  # a directory, a permission problem
        raise CheckpointError(f"{file} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return data


def read_checkpoint_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint, with a clear error when missing or corrupt.

    Only the file is checked here; `checkpoint_model_config` checks the model section's values.
    """
    file = Path(ckpt_dir) / CONFIG_FILE
    data = read_json_config(file)
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{file} is not an acornlm checkpoint config (no `model` section)")
    return data


def checkpoint_model_config(info: dict[str, Any], file: Path) -> ModelConfig:
    """The validated ModelConfig of a checkpoint's config.json (`info`), or a CheckpointError
    that names `file` and the bad field (bounds, finite numbers: see ModelConfig.validate)."""
    try:
        config = ModelConfig.from_dict(info["model"])
    except (ConfigError, TypeError, ValueError, OverflowError, KeyError) as exc:
        raise CheckpointError(f"{file}: invalid model section: {exc}") from exc
    if config.vocab_size == 0:
        raise CheckpointError(f"{file}: invalid model section: model.vocab_size is 0; a checkpoint records "
                              "the vocabulary size its weights were built with")
    return config


def read_weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header alone (no tensor
    data is read), so a config can be checked against the weights before memory is allocated."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except FileNotFoundError as exc:
        raise CheckpointError(f"{weights} is missing") from exc
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {exc}") from exc


def check_weight_shapes(model: Transformer, shapes: dict[str, tuple[int, ...]], weights: Path,
                        config_file: Path) -> None:
    """Compare a model built on the meta device (no memory) with the file's tensor shapes.

    A config.json that disagrees with model.safetensors (hidden_size 65536 next to a 1 MB file)
    must fail here, naming the field, and not after allocating the model it describes.
    """
    config = model.config
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()  # a tied head may be stored
    layers = {int(name.split(".")[2]) for name in shapes if re.match(r"model\.layers\.\d+\.", name)}
    if layers and len(layers) != config.num_hidden_layers:
        raise CheckpointError(f"{weights} holds {len(layers)} layers, but {config_file} says "
                              f"model.num_hidden_layers={config.num_hidden_layers}")
    missing = sorted(set(expected) - set(shapes) - optional)
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match {config_file}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"{weights} does not match {config_file}: {name} has shape {list(shape)} in the file, but the "
                f"model section implies {list(expected[name])}{suspect_fields(config, expected[name], shape)}")


def suspect_fields(config: ModelConfig, expected: tuple[int, ...], actual: tuple[int, ...]) -> str:
    """' (check model.hidden_size=65536)': the config fields whose value is a dimension that differs."""
    wrong = {size for size, got in zip(expected, actual, strict=False) if size != got}
    names = [f"model.{name}={value}" for name, value in config.to_dict().items()
             if isinstance(value, int) and not isinstance(value, bool) and value in wrong]
    return f" (check {', '.join(names)})" if names else ""


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


def read_weights(weights: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError naming the file when it is missing or corrupt."""
    try:
        return load_file(str(weights), device=str(device))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{weights} is missing") from exc
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {exc}") from exc


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, dict[str, Any]]:
    """Build the model of a checkpoint and load its safetensors weights; returns (model, config.json)."""
    ckpt = resolve_checkpoint(path)
    info = read_checkpoint_config(ckpt)
    config = checkpoint_model_config(info, ckpt / CONFIG_FILE)
    weights = ckpt / WEIGHTS_FILE
    shapes = read_weight_shapes(weights)
    with torch.device("meta"):  # no memory yet: shapes are checked against the file's header first
        model = Transformer(config)
    check_weight_shapes(model, shapes, weights, ckpt / CONFIG_FILE)
    state = read_weights(weights, device)
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


