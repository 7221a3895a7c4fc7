"""Use an acornlm model elsewhere, and bring other models in.

    export_hf(ckpt, out)        a verified Hugging Face transformers folder (Llama / Qwen3 / GPT-2 classes)
    import_hf(model_dir, out)   a local transformers folder as an acornlm checkpoint
    export_gguf(ckpt, out)      a GGUF file for llama.cpp / Ollama (acornlm.export.gguf)

Imports are lazy so `import acornlm.export` stays cheap and works without the optional packages.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_gguf", "export_hf", "import_hf"]


def __getattr__(name: str) -> Any:
    if name == "export_hf":
        from acornlm.export.hf import export_hf

        return export_hf
    if name == "import_hf":
        from acornlm.export.hf_import import import_hf

        return import_hf
    if name == "export_gguf":
        from acornlm.export.gguf import export_gguf

        return export_gguf
    raise AttributeError(f"module 'acornlm.export' has no attribute {name!r}")
