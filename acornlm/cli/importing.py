"""`acornlm import hf`: a local Hugging Face model folder as an acornlm checkpoint.

(The module is not called `import.py` because `import` is a Python keyword.)
"""

from __future__ import annotations

from acornlm.errors import ConfigError


def hf(model: str | None = None, out: str | None = None, force: bool = False) -> None:
    """Import a local transformers model folder (Llama, Mistral, Qwen2, Qwen3 or GPT-2) as an acornlm checkpoint.

    Nothing is downloaded: --model is a folder with config.json and model.safetensors (or shards, or
    pytorch_model.bin), as `save_pretrained` or `huggingface-cli download` leave it. Options acornlm
    cannot compute exactly (RoPE scaling, sliding windows, mixture of experts, ...) are refused by name.

    Args:
        model: The Hugging Face model folder.
        out: Checkpoint directory to create; usable by `acornlm generate` and `acornlm export`.
        force: Replace --out if it exists.
    """
    from acornlm.export.hf_import import import_hf
    from acornlm.model.checkpoint import read_checkpoint_config

    if model is None:
        raise ConfigError("--model is required: a local Hugging Face model folder")
    if out is None:
        raise ConfigError("--out is required: the checkpoint directory to create")
    path = import_hf(model, out, force=force)
    info = read_checkpoint_config(path)
    m = info["model"]
    print(f"imported {model} ({info['source']['architecture']}: {m['num_hidden_layers']} layers, "
          f"hidden {m['hidden_size']}, vocabulary {m['vocab_size']}) -> {path}")
