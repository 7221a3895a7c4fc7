"""`acornlm chat`: talk to a checkpoint in the terminal, with streaming replies and a few commands."""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Any, TextIO

from acornlm.cli.terminal import visible
from acornlm.data.chat import IM_END_ID, chat_text, message_problem
from acornlm.errors import AcornError, ConfigError
from acornlm.infer.api import LanguageModel
from acornlm.infer.sampling import SamplingParams, offset_seed
from acornlm.tokenizer import SPECIAL_TOKENS

HELP = """commands:
  /reset              forget the conversation (the system prompt stays)
  /set KEY VALUE      change a setting: temperature (0-2), top_p, top_k, min_p, max_new_tokens,
                      repetition_penalty (0.01-100), frequency_penalty and presence_penalty (-2 to 2),
                      seed (none = random), system (the system prompt)
  /show               print the current settings
  /help               this text
  /quit               leave (Ctrl-D works too)"""


def parse_setting(sampling: dict, key: str, value: str) -> dict:
    """The sampling settings with `key` set to `value`, converted to the setting's type and validated."""
    key = {"max_tokens": "max_new_tokens"}.get(key, key)
    settable = {f.name for f in fields(SamplingParams)} - {"stop", "stop_token_ids", "num_samples"}
    if key not in settable:
        raise ConfigError(f"unknown setting {key!r}; settable: {', '.join(sorted(settable))}, system")
    if key == "seed" and value.lower() in ("none", ""):
        converted = None
    elif key in ("seed", "max_new_tokens", "top_k"):
        converted = _number(key, value, int)
    else:
        converted = _number(key, value, float)
    updated = {**sampling, key: converted}
    SamplingParams.from_kwargs(**updated)  # validates; raises ConfigError with the allowed range
    return updated


def _number(key: str, value: str, kind: type) -> int | float:
    try:
        return kind(value)
    except ValueError as exc:  # not a number, or an integer over Python's 4300 digits
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ConfigError(f"{key} needs {'an integer' if kind is int else 'a number'}, got {shown!r}") from exc


def check_system_prompt(system: str | None) -> str | None:
    """The system prompt, or ConfigError when it holds a ChatML special token (as a user message may
    not): it would end the system turn early and let the prompt forge turns of its own."""
    problem = system and message_problem([{"role": "system", "content": system}], need_assistant=False)
    if problem:
        raise ConfigError(f"the system prompt is refused: {problem} (only the chat template may write them)")
    return system


def read_line(stdin: TextIO) -> str | None:
    """The next input line (None at the end of input); ConfigError for a line that is not UTF-8 text.

    The terminal's bytes arrive decoded with errors="surrogateescape" (see `chat`), so a bad byte
    shows up as a lone surrogate here instead of an exception that would end the session.
    """
    try:
        line = stdin.readline()
    except UnicodeDecodeError as exc:
        raise ConfigError("that line is not valid UTF-8 text; type it again") from exc
    if not line:
        return None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError("that line is not valid UTF-8 text; type it again") from exc
    return line


def fit_history(history: list[dict[str, str]], system: str | None, count_tokens, budget: int) -> list[dict[str, str]]:
    """The conversation to send: the system prompt and the latest turns whose prompt fits in `budget` tokens.

    Old turns are dropped first (a user message with its reply), so the model always sees the newest message.
    """
    head = [{"role": "system", "content": system}] if system else []
    kept = list(history)
    while len(kept) > 2 and count_tokens(chat_text(head + kept, add_generation_prompt=True)) > budget:
        del kept[:2]
    return head + kept


def chat(
    ckpt: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int | None = None,
) -> None:
    """Chat with a checkpoint in the terminal: multi-turn, streamed replies, /reset, /set KEY VALUE, /quit.

    The conversation is rendered with the ChatML template of the tokenizer (as the server and
    Hugging Face do); a reply ends at <|im_end|> or <|endoftext|>. When the conversation outgrows
    the context, the oldest turns are dropped.

    Args:
        ckpt: Checkpoint directory, or a run directory (its latest checkpoint is used).
        system: System prompt placed before the conversation (ChatML special tokens are refused).
        max_new_tokens: Most tokens per reply.
        temperature: Sampling temperature in [0, 2]; 0 (or below 1e-5) = greedy.
        top_k: Sample only among the k most likely tokens; 0 = no limit.
        top_p: Nucleus sampling threshold; 1 = off.
        min_p: Drop tokens less likely than min_p x the most likely one; 0 = off.
        repetition_penalty: Penalty > 1 on tokens already seen, in [0.01, 100]; 1 = off.
        seed: Random seed of the first reply (later replies use seed + turn number); none = random.
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N" or "mps".
        dtype: "auto" (as stored in the checkpoint), "float32", "bfloat16" or "float16".
        quantize: "none", or "int8": int8 weights in the linear layers, for faster CPU decoding of a few
            sequences at a time (logits change slightly; see acornlm/infer/quantize.py).
        rope_scaling: Run beyond the trained length with scaled RoPE, e.g. '{"rope_type": "yarn", "factor": 4}'
            ("linear" and "dynamic" too; original_max_position_embeddings defaults to the trained length).
        max_position_embeddings: Longest sequence to accept; default: trained length x rope_scaling factor.
    """
    if ckpt is None:
        raise ConfigError("--ckpt is required: a checkpoint directory or a run directory")
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, seed=seed)
    SamplingParams.from_kwargs(**sampling)  # bad settings fail before the model loads
    check_system_prompt(system)
    lm = LanguageModel.from_checkpoint(ckpt, device=device, dtype=dtype, quantize=quantize,
                                       rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte becomes an error line, not a crash
    run_chat(lm, sampling, system, sys.stdin, sys.stdout)


def run_chat(lm, sampling: dict, system: str | None, stdin: TextIO, stdout: TextIO) -> None:
    """The read-reply loop, on any text streams (so tests can drive it)."""
    stop_ids = [IM_END_ID, lm.tokenizer.eot_id]
    context = lm.config.max_position_embeddings
    history: list[dict[str, str]] = []
    turn = 0
    stdout.write("acornlm chat: type a message; /help lists the commands, /quit leaves.\n")
    while True:
        stdout.write("\nyou> ")
        stdout.flush()
        try:
            line = read_line(stdin)
        except ConfigError as exc:
            stdout.write(f"error: {visible(str(exc))}\n")
            continue
        if line is None:  # end of input (Ctrl-D)
            stdout.write("\n")
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                history.clear()
                stdout.write("(conversation cleared)\n")
            elif command == "/help":
                stdout.write(HELP + "\n")
            elif command == "/show":
                stdout.write(f"system: {visible(repr(system))}\n" + "".join(f"{k}: {v}\n" for k, v in sampling.items()))
            elif command == "/set":
                key, _, value = rest.strip().partition(" ")
                try:
                    if key == "system":
                        system = check_system_prompt(value or None)
                    else:
                        sampling = parse_setting(sampling, key, value.strip())
                    stdout.write(f"({visible(key)} = {visible(value.strip()) or 'none'})\n")
                except ConfigError as exc:
                    stdout.write(f"error: {visible(str(exc))}\n")
            else:
                stdout.write(f"unknown command {visible(command)}; /help lists the commands\n")
            continue

        problem = message_problem(history + [{"role": "user", "content": text}], need_assistant=False)
        if problem:
            stdout.write(f"error: {visible(problem)}\n")
            continue
        history.append({"role": "user", "content": text})
        budget = max(1, context - sampling["max_new_tokens"])
        messages = fit_history(history, system, lambda s: len(lm.encode(s)), budget)
        params = dict(sampling, stop_token_ids=stop_ids)
        if sampling.get("seed") is not None:
            params["seed"] = offset_seed(sampling["seed"], turn)
        stdout.write("assistant> ")
        reply = ""
        try:
            for piece in lm.stream(chat_text(messages, add_generation_prompt=True), **params):
                reply += piece
                stdout.write(visible(piece))
                stdout.flush()
        except AcornError as exc:  # e.g. GenerationError (nan logits): this reply fails, the session goes on
            history.pop()  # the unanswered message, so the turns still alternate
            stdout.write(f"\nerror: {visible(str(exc))}\n")
            continue
        stdout.write("\n")
        for token in SPECIAL_TOKENS:  # a special token in a reply would make the next prompt invalid
            reply = reply.replace(token, "")
        history.append({"role": "assistant", "content": reply})
        turn += 1
