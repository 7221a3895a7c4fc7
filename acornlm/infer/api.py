"""`LanguageModel`: a checkpoint's model and tokenizer behind text-in, text-out methods.

    import acornlm
    lm = acornlm.load("runs/demo")                       # run dir or checkpoint dir
    print(lm.generate("ROMEO:", max_new_tokens=50, temperature=0.8, seed=0))
    for piece in lm.stream("JULIET:", stop=["\\n\\n"]):
        print(piece, end="", flush=True)

The returned text is the continuation only (the prompt is not repeated). Generation ends at the
end-of-text token, a stop token or string, max_new_tokens or the context limit (see `generate.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from acornlm.accel import accelerate
from acornlm.errors import CheckpointError, ConfigError
from acornlm.infer.generate import generate_batch
from acornlm.infer.quantize import quantize_model
from acornlm.infer.sampling import SamplingParams
from acornlm.infer.streaming import StreamingDetokenizer
from acornlm.model import Transformer
from acornlm.model.checkpoint import resolve_checkpoint
from acornlm.model.lora import load_model_with_adapter
from acornlm.model.rope import extend_context
from acornlm.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" means cuda when available, else cpu; anything else is passed to torch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None or "auto" keeps the checkpoint's dtype; otherwise "float32", "bfloat16", "float16" or a torch.dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class LanguageModel:
    """A model and its tokenizer, ready to generate text.

    Attributes:
        model: The `Transformer`, in eval mode, its linear weights packed for oneDNN on a CPU
            (`acornlm.accel.accelerate(model, mode="infer")`: faster decoding, a second copy of those weights).
        tokenizer: The `Tokenizer` it was trained with.
        config: The model's `ModelConfig`.
        info: The checkpoint's whole config.json (run info included); empty when built directly.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, info: dict[str, Any] | None = None) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise CheckpointError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}: "
                "they do not belong together; use the tokenizer files saved with the checkpoint"
            )
        self.model = accelerate(model.eval(), mode="infer")
        self.tokenizer = tokenizer
        self.config = model.config
        self.info = info or {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto",
                        dtype: str | torch.dtype | None = None, quantize: str = "none", *,
                        rope_scaling: dict[str, Any] | None = None,
                        max_position_embeddings: int | None = None) -> LanguageModel:
        """Load a checkpoint directory (or a run directory's latest checkpoint) for generation.

        A LoRA checkpoint (adapter_config.json beside the base weights) loads with its adapter, unmerged.
        `quantize="int8"` stores the linear layers' weights as int8 (faster CPU decoding, see
        `acornlm.infer.quantize`).
        `rope_scaling` ({"rope_type": "yarn", "factor": 4}, also "linear" or "dynamic") and
        `max_position_embeddings` run the model beyond its trained length (see `acornlm.model.rope`).
        """

        ckpt_dir = resolve_checkpoint(path)
        model, info = load_model_with_adapter(ckpt_dir, device=resolve_device(device), dtype=resolve_dtype(dtype))
        extend_context(model, rope_scaling, max_position_embeddings)
        return cls(quantize_model(model, quantize), load_tokenizer(ckpt_dir), info)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def generate(self, prompt: str, **sampling) -> str | list[str]:
        """The continuation of `prompt`; a list of `num_samples` continuations when num_samples > 1.

        Keyword arguments are the fields of `SamplingParams` (max_new_tokens, temperature, top_k,
        top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty, stop, stop_token_ids,
        seed, num_samples).
        """
        params = SamplingParams.from_kwargs(**sampling)
        texts = [""] * params.num_samples
        for sample, piece in self._stream_samples(prompt, params):
            texts[sample] += piece
        return texts[0] if params.num_samples == 1 else texts

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """The continuation of `prompt` as text pieces, yielded as soon as they are final (one sample)."""
        params = SamplingParams.from_kwargs(**sampling)
        if params.num_samples != 1:
            raise ConfigError("stream() yields one sample; use stream_samples() or generate() for num_samples > 1")
        for _, piece in self._stream_samples(prompt, params):
            yield piece

    def stream_samples(self, prompt: str, **sampling) -> Iterator[tuple[int, str]]:
        """(sample index, text piece) pairs for `num_samples` continuations decoded together as one batch."""
        return self._stream_samples(prompt, SamplingParams.from_kwargs(**sampling))

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the prompt; an empty prompt starts from the end-of-text token (a fresh document)."""
        if not isinstance(prompt, str):
            raise ConfigError(f"the prompt must be a string, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]

    def _stream_samples(self, prompt: str, params: SamplingParams) -> Iterator[tuple[int, str]]:
        """Decode the samples as one batch and turn each one's tokens into text pieces."""
        detokenizers = [StreamingDetokenizer(self.tokenizer.token_bytes, params.stop)
                        for _ in range(params.num_samples)]
        ended = [False] * params.num_samples
        steps = generate_batch(self.model, self.prompt_ids(prompt), params,
                               eos_ids=[self.tokenizer.eot_id], vocab_size=self.tokenizer.vocab_size)
        for step_tokens in steps:
            for sample, token in enumerate(step_tokens):
                if ended[sample]:
                    continue
                detok = detokenizers[sample]
                if token is None:  # end-of-text or a stop token
                    ended[sample] = True
                    piece = detok.flush()
                else:
                    piece = detok.push(token)
                    ended[sample] = detok.stopped
                if piece:
                    yield sample, piece
            if all(ended):
                break
        for sample, detok in enumerate(detokenizers):
            if not ended[sample]:  # max_new_tokens or the context limit
                piece = detok.flush()
                if piece:
                    yield sample, piece
