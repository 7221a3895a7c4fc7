"""`acornlm chat`: talk to a checkpoint in the terminal, with streaming replies and a few commands.

A reply is split as the server splits it (acornlm.serve.replies): the thinking inside a leading
<think>...</think> is shown dimmed (prefixed with "(thinking)" when the output is not a terminal),
then the answer. With `--tools FILE.py` the file's functions are offered to the model as tools
(acornlm.infer.tools); when the model replies with valid calls they are run, their results go back
as `tool` messages and the model continues, for at most `--max_tool_rounds` rounds per message.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

from acornlm.cli.terminal import visible
from acornlm.data.chat import ADD_CHAT_TOKENS_HINT, IM_END_ID, chat_text, message_problem
from acornlm.errors import AcornError, ConfigError
from acornlm.infer.api import LanguageModel
from acornlm.infer.sampling import SamplingParams, offset_seed
from acornlm.infer.tools import call_tool, function_schema, load_tool_functions
from acornlm.serve.replies import FinishedReply, ReplyAssembler
from acornlm.tokenizer import SPECIAL_TOKENS

HELP = """commands:
  /reset              forget the conversation (the system prompt stays)
  /set KEY VALUE      change a setting: temperature (0-2), top_p, top_k, min_p, max_new_tokens,
                      repetition_penalty (0.01-100), frequency_penalty and presence_penalty (-2 to 2),
                      seed (none = random), system (the system prompt)
  /think on|off       make the model think before answering, or answer at once (enable_thinking);
                      /think default leaves it to the model
  /show               print the current settings
  /help               this text
  /quit               leave (Ctrl-D works too)"""
DIM, RESET = "\x1b[2m", "\x1b[0m"
THINK_SETTINGS = {"on": True, "off": False, "default": None}
SHOWN_RESULT_CHARS = 2000  # a tool result is printed up to this long (the model gets all of it)


@dataclass
class ChatTools:
    """The functions offered to the model (`--tools FILE.py`) and how they are run."""

    functions: dict[str, Callable[..., Any]] = field(default_factory=dict)
    timeout_s: float = 10.0
    max_rounds: int = 4

    @property
    def schemas(self) -> list[dict[str, Any]] | None:
        return [function_schema(fn) for fn in self.functions.values()] or None


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


def fit_history(history: list[dict[str, Any]], system: str | None, count_tokens, budget: int, *,
                tools: list[dict[str, Any]] | None = None, enable_thinking: bool | None = None) -> list[dict[str, Any]]:
    """The conversation to send: the system prompt and the latest turns whose prompt fits in `budget` tokens.

    Old exchanges are dropped first (a user message with everything up to the next one: the reply,
    its tool calls and their results), so the model always sees the newest message and the
    conversation stays valid.
    """
    head = [{"role": "system", "content": system}] if system else []
    kept = list(history)
    while count_tokens(chat_text(head + kept, add_generation_prompt=True, tools=tools,
                                 enable_thinking=enable_thinking)) > budget:
        later_user = next((i for i, message in enumerate(kept) if i > 0 and message["role"] == "user"), None)
        if later_user is None:
            break
        del kept[:later_user]
    return head + kept


def without_special_tokens(text: str) -> str:
    """`text` without ChatML special tokens: one in a stored reply or tool result would make the next
    prompt invalid (message_problem refuses them)."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "")
    return text


def missing_chat_tokens(lm) -> list[str]:
    """The chat tokens lm's tokenizer lacks (a stand-in model without the attribute is taken to have them)."""
    return list(getattr(lm.tokenizer, "missing_chat_tokens", []))


def check_chat_tokens(lm, what: str) -> None:
    """ConfigError when the tokenizer lacks the chat tokens that `what` (thinking, tools) is written with."""
    missing = missing_chat_tokens(lm)
    if missing:
        raise ConfigError(f"{what} needs the chat tokens, and this tokenizer lacks {', '.join(missing)}: "
                          f"{ADD_CHAT_TOKENS_HINT}")


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
    think: bool | None = None,
    tools: str | None = None,
    tool_timeout: float = 10.0,
    max_tool_rounds: int = 4,
) -> None:
    """Chat with a checkpoint in the terminal: multi-turn, streamed replies, /reset, /set KEY VALUE,
    /think on|off, /quit; with --tools FILE.py the model may call your Python functions.

    The conversation is rendered with the ChatML template of the tokenizer (as the server and
    Hugging Face do); a reply ends at <|im_end|> or <|endoftext|>. When the conversation outgrows
    the context, the oldest turns are dropped. The model's thinking (<think>...</think>) is shown
    dimmed before its answer.

    Tools: every public top-level function of FILE.py is offered (name, first docstring line, JSON
    schema from the type hints). A valid call is run with a timeout; its return value (or its
    error, or "timed out") goes back to the model as the tool's result, and the model goes on. A
    malformed call is shown as text. Loading the file runs it: use files you trust.

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
        think: Start with thinking on (true) or off (false), as /think does; default: the model decides.
        tools: A Python file whose public top-level functions the model may call (see above).
        tool_timeout: Seconds a tool call may take; then its result is an error and the chat goes on
            (the call is abandoned in a background thread, see acornlm/infer/tools.py).
        max_tool_rounds: Most rounds of tool calls per message before the model must answer.
    """
    if ckpt is None:
        raise ConfigError("--ckpt is required: a checkpoint directory or a run directory")
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, seed=seed)
    SamplingParams.from_kwargs(**sampling)  # bad settings fail before the model loads
    check_system_prompt(system)
    if not tool_timeout > 0:
        raise ConfigError(f"--tool_timeout must be > 0 seconds, got {tool_timeout}")
    if max_tool_rounds < 1:
        raise ConfigError(f"--max_tool_rounds must be >= 1, got {max_tool_rounds}")
    chat_tools = ChatTools(load_tool_functions(tools) if tools else {}, tool_timeout, max_tool_rounds)
    lm = LanguageModel.from_checkpoint(ckpt, device=device, dtype=dtype, quantize=quantize,
                                       rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings)
    if chat_tools.functions:
        check_chat_tokens(lm, "--tools")
    if think is not None:
        check_chat_tokens(lm, "--think")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte becomes an error line, not a crash
    run_chat(lm, sampling, system, sys.stdin, sys.stdout, chat_tools, think)


class ReplyPrinter:
    """Writes a reply as it streams: thinking dimmed (or prefixed with "(thinking)" when `stdout` is
    not a terminal), then the answer, every piece through `visible` (no terminal escapes)."""

    def __init__(self, stdout: TextIO) -> None:
        self.stdout = stdout
        self.tty = bool(getattr(stdout, "isatty", lambda: False)())
        self.thinking = False

    def write(self, kind: str, text: str) -> None:
        if not text:
            return
        if kind == "reasoning" and not self.thinking:
            self.stdout.write((DIM if self.tty else "") + "(thinking) ")
            self.thinking = True
        elif kind == "content" and self.thinking:
            self.end_thinking()
            self.stdout.write("\n")
        self.stdout.write(visible(text))
        self.stdout.flush()

    def end_thinking(self) -> None:
        if self.thinking and self.tty:
            self.stdout.write(RESET)
        self.thinking = False


def run_chat(lm, sampling: dict, system: str | None, stdin: TextIO, stdout: TextIO,
             tools: ChatTools | None = None, enable_thinking: bool | None = None) -> None:
    """The read-reply loop, on any text streams (so tests can drive it)."""
    tools = tools or ChatTools()
    stop_ids = [IM_END_ID, lm.tokenizer.eot_id]
    context = lm.config.max_position_embeddings
    history: list[dict[str, Any]] = []
    turn = 0
    parse = not missing_chat_tokens(lm)  # without <think> as a token, "<think>" is plain text
    schemas = tools.schemas
    if tools.functions:
        stdout.write(f"tools: {', '.join(tools.functions)}\n")
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
                stdout.write(f"system: {visible(repr(system))}\n" + "".join(f"{k}: {v}\n" for k, v in sampling.items())
                             + f"think: {next(k for k, v in THINK_SETTINGS.items() if v is enable_thinking)}\n"
                             + f"tools: {', '.join(tools.functions) or 'none'}\n")
            elif command == "/think":
                setting = rest.strip().lower()
                try:
                    if setting not in THINK_SETTINGS:
                        raise ConfigError(f"/think takes on, off or default, got {visible(setting) or 'nothing'!r}")
                    if THINK_SETTINGS[setting] is not None:
                        check_chat_tokens(lm, "/think")
                    enable_thinking = THINK_SETTINGS[setting]
                    stdout.write(f"(think = {setting})\n")
                except ConfigError as exc:
                    stdout.write(f"error: {visible(str(exc))}\n")
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
        start = len(history)
        history.append({"role": "user", "content": text})
        budget = max(1, context - sampling["max_new_tokens"])
        try:
            for round_number in range(tools.max_rounds + 1):
                messages = fit_history(history, system, lambda s: len(lm.encode(s)), budget, tools=schemas,
                                       enable_thinking=enable_thinking)
                params = dict(sampling, stop_token_ids=stop_ids)
                if sampling.get("seed") is not None:
                    params["seed"] = offset_seed(sampling["seed"], turn)
                turn += 1
                # the last round offers no tools, so the model answers instead of calling again
                offered = schemas if round_number < tools.max_rounds else None
                prompt = chat_text(messages, add_generation_prompt=True, tools=offered,
                                   enable_thinking=enable_thinking)
                stdout.write("assistant> ")
                done = stream_reply(lm, prompt, params, stdout, parse, offered, enable_thinking)
                history.append(reply_message(done, enable_thinking))
                if not done.calls:
                    break
                history.extend(run_tool_calls(done.calls, tools, stdout))
        except AcornError as exc:  # e.g. GenerationError (nan logits): this reply fails, the session goes on
            del history[start:]  # the unanswered message and its tool rounds, so the turns still alternate
            stdout.write(f"\nerror: {visible(str(exc))}\n")
            continue


def stream_reply(lm, prompt: str, params: dict, stdout: TextIO, parse: bool, tools: list[dict[str, Any]] | None,
                 enable_thinking: bool | None) -> FinishedReply:
    """Generate and print one reply; what it holds (thinking, answer, valid tool calls) when done.
    Without `parse` (a tokenizer without the chat tokens) the text is printed and kept as it comes."""
    assembler = ReplyAssembler(tools, in_thinking=enable_thinking is True) if parse else None
    printer = ReplyPrinter(stdout)
    text = ""
    try:
        for piece in lm.stream(prompt, **params):
            text += piece
            if assembler is None:
                printer.write("content", piece)
                continue
            for kind, part in assembler.feed(piece):
                printer.write(kind, part)
    finally:
        printer.end_thinking()  # an error message after a failed reply is not dimmed
    if assembler is None:
        stdout.write("\n")
        return FinishedReply(content=text)
    done = assembler.finish()
    printer.write("reasoning", done.reasoning_rest)
    printer.write("content", done.content_rest)
    printer.end_thinking()
    stdout.write("\n")
    for problem in done.problems:
        stdout.write(f"(tool call not run: {visible(problem)})\n")
    return done


def reply_message(done: FinishedReply, enable_thinking: bool | None = None) -> dict[str, Any]:
    """The assistant message to keep in the history: answer, thinking and calls, without special tokens.
    With thinking off the prompt held an empty think block, so the message keeps one (reasoning "")
    and the next prompt shows the model what it saw."""
    message: dict[str, Any] = {"role": "assistant", "content": without_special_tokens(done.content)}
    if done.reasoning is not None:
        message["reasoning_content"] = without_special_tokens(done.reasoning)
    elif enable_thinking is False:
        message["reasoning_content"] = ""
    if done.calls:
        message["tool_calls"] = done.calls
        if message_problem([{"role": "user", "content": "-"}, message], need_assistant=False):
            del message["tool_calls"]  # a call holding a special token: keep its text only
            message["content"] += "\n" + json.dumps(done.calls, ensure_ascii=False)
            done.calls = []
    return message


def run_tool_calls(calls: list[dict[str, Any]], tools: ChatTools, stdout: TextIO) -> list[dict[str, Any]]:
    """Run each call (with the timeout) and return the `tool` messages of their results, in order."""
    results = []
    for call in calls:
        shown = f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"
        stdout.write(f"tool> {visible(shown)}\n")
        stdout.flush()
        result = call_tool(tools.functions[call["name"]], call["arguments"], tools.timeout_s)
        shown = result.text if len(result.text) <= SHOWN_RESULT_CHARS else \
            f"{result.text[:SHOWN_RESULT_CHARS]}... ({len(result.text) - SHOWN_RESULT_CHARS} more characters)"
        stdout.write(f"tool result> {visible(shown)}\n")
        results.append({"role": "tool", "content": without_special_tokens(result.text)})
    return results
