"""Use an acornlm model elsewhere, and bring other models in.

    export_hf(ckpt, out)        a verified Hugging Face transformers folder (Llama / Qwen3 / GPT-2 classes)
    import_hf(model_dir, out)   a local transformers folder as an acornlm checkpoint
    export_gguf(ckpt, out)      a GGUF file for llama.cpp / Ollama (acornlm.export.gguf)

The optional packages (transformers, gguf) are imported by the functions that need them, so
`import acornlm.export` works without them.
"""

from acornlm.export.gguf import export_gguf
from acornlm.export.hf import export_hf
from acornlm.export.hf_import import import_hf

__all__ = ["export_gguf", "export_hf", "import_hf"]
