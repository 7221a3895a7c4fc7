"""`acornlm generate`: sample text from a checkpoint, printed as it is generated."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from acornlm.cli.terminal import visible
from acornlm.errors import ConfigError, DataError
from acornlm.infer.sampling import SamplingParams

# The longest prompt file read: far beyond any model's context (a prompt is cut to the context
# anyway), and small enough that `--prompt_file /dev/zero` ends at once with a clear error.
MAX_PROMPT_FILE_BYTES = 16 * 2**20


def read_prompt_file(prompt_file: str) -> str:
    """The UTF-8 text of a prompt file, read up to MAX_PROMPT_FILE_BYTES; DataError naming the file."""
    path = Path(prompt_file)
    if path.is_dir():
        raise DataError(f"prompt file {prompt_file} is a directory; give a text file")
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PROMPT_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise DataError(f"prompt file {prompt_file} does not exist") from exc
    except OSError as exc:
        raise DataError(f"prompt file {prompt_file} cannot be read: {exc.strerror or exc}") from exc
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise DataError(f"prompt file {prompt_file} is larger than {MAX_PROMPT_FILE_BYTES // 2**20} MiB, far "
                        "beyond any model's context; give a shorter prompt")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"prompt file {prompt_file} is not UTF-8 text (byte offset {exc.start})") from exc


def read_prompt(prompt: str | list[str] | None, prompt_file: str | None) -> str:
    """The prompt from --prompt (several words are joined with spaces) or from --prompt_file, not both."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give either --prompt or --prompt_file, not both")
    if prompt_file is not None:
        return read_prompt_file(prompt_file)
    if prompt is None:
        raise ConfigError("--prompt is required (or --prompt_file); use --prompt '' to start from nothing")
    return " ".join(prompt) if isinstance(prompt, list) else prompt


def unescape(text: str) -> str:
    r"""Turn the escapes \n, \t and \\ typed on a command line into the characters they name."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def generate(
    ckpt: str | None = None,
    prompt: str | list[str] | None = None,
    prompt_file: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int | None = None,
) -> None:
    r"""Generate text from a checkpoint, printing it as it is generated.

    The prompt is printed first, then its continuation. With --num_samples N the samples are
    decoded together as one batch; the first is printed as it is generated, the others follow,
    each after a divider line. Control characters (terminal escapes) in the prompt and output are
    printed visibly, as \x1b, never sent to the terminal raw.

    Args:
        ckpt: Checkpoint directory, or a run directory (its latest checkpoint is used).
        prompt: Text to continue ('' starts a fresh document).
        prompt_file: Read the prompt from this UTF-8 file (at most 16 MiB) instead of --prompt.
        max_new_tokens: Most tokens to generate per sample.
        temperature: Sampling temperature in [0, 2]; 0 (or below 1e-5) = greedy (always the most likely token).
        top_k: Sample only among the k most likely tokens; 0 = no limit.
        top_p: Nucleus sampling: smallest set of tokens whose probabilities sum to >= top_p; 1 = off.
        min_p: Drop tokens less likely than min_p x the most likely token; 0 = off.
        repetition_penalty: Penalty > 1 on tokens already in the prompt or output (CTRL-style), in [0.01, 100]; 1 = off.
        frequency_penalty: Subtract this x (times a token was generated) from its logit, in [-2, 2]; 0 = off.
        presence_penalty: Subtract this from the logit of every token generated at least once, in [-2, 2]; 0 = off.
        stop: Stop strings (several allowed); the output ends before the first one. \n and \t are understood.
        seed: Random seed; the same seed and settings print the same text.
        num_samples: Number of independent samples of the same prompt (at most 256).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N" or "mps".
        dtype: "auto" (as stored in the checkpoint), "float32", "bfloat16" or "float16".
        quantize: "none", or "int8": int8 weights in the linear layers, for faster CPU decoding of a few
            sequences at a time (logits change slightly; see acornlm/infer/quantize.py).
        rope_scaling: Run beyond the trained length with scaled RoPE, e.g. '{"rope_type": "yarn", "factor": 4}'
            ("linear" and "dynamic" too; original_max_position_embeddings defaults to the trained length).
        max_position_embeddings: Longest sequence to accept; default: trained length x rope_scaling factor.
    """
    from acornlm.infer.api import LanguageModel

    if ckpt is None:
        raise ConfigError("--ckpt is required: a checkpoint directory or a run directory")
    text = read_prompt(prompt, prompt_file)
    sampling = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, stop=[unescape(s) for s in stop or []], seed=seed,
        num_samples=num_samples,
    )
    SamplingParams.from_kwargs(**sampling)  # bad settings fail before the model loads
    lm = LanguageModel.from_checkpoint(ckpt, device=device, dtype=dtype, quantize=quantize,
                                       rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings)
    out = sys.stdout
    if num_samples == 1:
        out.write(visible(text))
        for piece in lm.stream(text, **sampling):
            out.write(visible(piece))
            out.flush()
        out.write("\n")
        out.flush()
        return
    later_samples = [""] * num_samples
    print_divider(out, 0, num_samples)
    out.write(visible(text))
    for sample, piece in lm.stream_samples(text, **sampling):
        if sample == 0:
            out.write(visible(piece))
            out.flush()
        else:
            later_samples[sample] += piece
    out.write("\n")
    for sample in range(1, num_samples):
        print_divider(out, sample, num_samples)
        out.write(visible(text + later_samples[sample]) + "\n")
    out.flush()


def print_divider(out, sample: int, num_samples: int) -> None:
    out.write(f"{'=' * 20} sample {sample + 1}/{num_samples} {'=' * 20}\n")
    out.flush()
