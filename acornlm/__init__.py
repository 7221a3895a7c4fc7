"""acornlm: train your own small language model from zero.

    import acornlm
    lm = acornlm.load("runs/demo")          # a run dir or a checkpoint dir
    print(lm.generate("ROMEO:", max_new_tokens=50))
"""

from acornlm.version import __version__


def load(path, device: str = "auto", dtype=None, quantize: str = "none"):
    """Load a checkpoint for generation: returns an `acornlm.infer.LanguageModel`."""
    from acornlm.infer.api import LanguageModel

    return LanguageModel.from_checkpoint(path, device=device, dtype=dtype, quantize=quantize)


__all__ = ["__version__", "load"]
