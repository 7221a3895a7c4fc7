"""`acornlm export hf|gguf`: the trained model in the formats other tools load."""

from __future__ import annotations

from acornlm.errors import ConfigError


def hf(ckpt: str | None = None, out: str | None = None, dtype: str = "float32", verify: bool | None = None,
       force: bool = False) -> None:
    """Export a checkpoint as a Hugging Face transformers model folder, and prove it in transformers.

    Writes config.json, generation_config.json, model.safetensors, the tokenizer files and a model card
    README.md. The architecture is a standard class (LlamaForCausalLM, Qwen3ForCausalLM or
    GPT2LMHeadModel); a model none of them computes exactly is refused with the reason.
    Verification loads the folder with transformers, compares logits on a fixed prompt
    (max difference <= 1e-4 in float32) and 32 greedy tokens, and fails the export if they differ.

    Args:
        ckpt: Checkpoint directory, or a run directory (its latest checkpoint is used).
        out: Folder to create; nothing is written there unless the whole export succeeds.
        dtype: Weight dtype: float32, bfloat16 or float16 (warns if the weights do not fit it).
        verify: Verify with transformers (default: when transformers is installed).
        force: Replace --out if it exists.
    """
    from acornlm.export.hf import describe_export, export_hf

    if ckpt is None:
        raise ConfigError("--ckpt is required: a checkpoint directory or a run directory")
    if out is None:
        raise ConfigError("--out is required: the folder to write the transformers model to")
    print(describe_export(export_hf(ckpt, out, dtype=dtype, verify=verify, force=force)), flush=True)


def gguf(ckpt: str | None = None, out: str | None = None, type: str = "f16", force: bool = False) -> None:
    """Export a checkpoint as one GGUF file for llama.cpp and Ollama.

    Args:
        ckpt: Checkpoint directory, or a run directory (its latest checkpoint is used).
        out: The .gguf file to write.
        type: Tensor type: f32, f16 or q8_0.
        force: Replace --out if it exists.
    """
    from acornlm.export.gguf import export_gguf

    if ckpt is None:
        raise ConfigError("--ckpt is required: a checkpoint directory or a run directory")
    if out is None:
        raise ConfigError("--out is required: the .gguf file to write")
    path = export_gguf(ckpt, out, type=type, force=force)
    print(f"exported {ckpt} -> {path} ({type})", flush=True)
