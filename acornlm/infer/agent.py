"""Multi-turn tool-using rollouts: the sampling of agentic RL (GRPO/PPO with tools) and of tool evaluation.

A *trajectory* is one conversation the model leads, calling tools along the way:

    prompt                      <|im_start|>system ...tools...<|im_end|> ... <|im_start|>assistant\\n
    turn 1 (sampled)            <tool_call>\\n{"name": "price", "arguments": {"item": "tea"}}\\n</tool_call><|im_end|>
    tool response (appended)    \\n<|im_start|>user\\n<tool_response>\\n7\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n
    turn 2 (sampled)            Tea costs 7.<|im_end|>

The appended piece is exactly what the chat template (acornlm.tokenizer.chat_template) renders after an
assistant turn's <|im_end|>, so `tokenizer.decode(trajectory.ids)` reads as `chat_text(trajectory.messages)`
and a trainer sees the layout SFT taught. The model's turns are kept as the token ids it sampled (never
re-tokenized), and `generated` marks them: a trainer computes the log-probabilities of exactly those
tokens and of no prompt or tool-response token (`trajectory_tensors`).

Interface (used by GRPO/PPO with tools and by evaluation of the tool demo):

    from acornlm.infer.agent import rollout_group, tool_schema, trajectory_tensors

    tools = [tool_schema(price)]                  # function_schema without the `example` parameter
    group = rollout_group(model, tokenizer, messages, tools=tools, functions={"price": price},
                          params=SamplingParams(num_samples=8, temperature=1.0, seed=s, max_new_tokens=64),
                          max_turns=3, example=record, timeout_s=2.0)
    group[0].reply.content, group[0].stats["valid_calls"], group[0].finish_reason
    input_ids, targets = trajectory_tensors(group, pad_id=tokenizer.eot_id)   # targets -100 off sampled tokens

How a group is sampled:

    turn 1        one `generate_batch` over the rendered prompt: all num_samples trajectories at once
    each reply    parse_reply(text, tools): valid calls -> run each function (call_tool, with a timeout),
                  append the responses, continue; invalid calls (unknown tool, arguments off the schema,
                  broken JSON) -> the trajectory ends, nothing runs; no call -> the final answer
    turns 2..     one `generate_batch` (num_samples=1) per continuing trajectory, over its whole
                  sequence so far: simpler than batching sequences of different lengths, and each
                  turn re-reads (prefills) the conversation, which is cheap next to sampling

Ending (`finish_reason`): "answer" (a reply without tool calls), "invalid_call", "max_turns" (the
last allowed turn still called tools; they do not run, there is no turn left to read them), or
"length" (a turn cut at max_new_tokens, or no room left for the tool responses and another turn
within max_total_tokens; stats["truncated"] = 1).

Tools never crash a rollout (acornlm.infer.tools.call_tool): a function that raises or runs past
`timeout_s` (its thread is abandoned) answers with an error text ("error: ...") the model reads like
any other response, counted in stats["tool_errors"] or stats["timeouts"]; a return value that is not
a string is JSON-encoded, and a text holding a token of the chat layout (<|im_end|>, ...) is replaced
by an error. A function with a keyword parameter named `example` receives the prompt's record
(`example=`): how a synthetic environment, say each question's own price table, reaches its tool.

Determinism: turn 1 samples with `params.seed`; turn t of trajectory i with a seed derived from
(params.seed, t, i), so the same seed, model and tools give the same trajectories, whichever other
trajectories go on (params.seed None: fresh randomness). Tools must be deterministic too.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from acornlm.data.chat import IM_END_ID, render_prompt
from acornlm.data.sft import IGNORE_INDEX
from acornlm.data.tools import Reply, parse_reply, tool_names
from acornlm.errors import ConfigError
from acornlm.infer.generate import generate_batch
from acornlm.infer.sampling import SamplingParams
from acornlm.infer.tools import ToolResult, call_tool, function_schema
from acornlm.model import Transformer
from acornlm.tokenizer import Tokenizer
from acornlm.tokenizer.chat_template import GENERATION_THINKING
from acornlm.tokenizer.special_tokens import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    SPECIAL_TOKENS,
    TOOL_CALL_START,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
)

STATS = ("turns", "tool_calls", "valid_calls", "invalid_calls", "tool_errors", "timeouts", "truncated")
# A tool's text may not hold these: they would end or forge turns of the chat layout.
FORBIDDEN_IN_RESPONSES = (*SPECIAL_TOKENS, TOOL_RESPONSE_START, TOOL_RESPONSE_END)


@dataclass
class Trajectory:
    """One sampled conversation: its token ids, which of them the model sampled, and what happened.

    stats: turns (assistant turns sampled), tool_calls (<tool_call> blocks the model wrote),
    valid_calls (calls that passed the schema check), invalid_calls (problems parse_reply reported;
    such calls never run; neither counts a turn cut at a length limit), tool_errors (a run that raised, whose arguments its signature refused, or
    whose text held a token of the chat layout), timeouts (a run past timeout_s), truncated (1 when a
    length limit ended the trajectory).
    """

    ids: list[int]            # prompt + every sampled turn + every tool response, one token sequence
    prompt_length: int        # the first prompt_length ids are the original prompt
    generated: list[int]      # 1 on the tokens the model sampled (incl. each closing stop token), else 0
    messages: list[dict[str, Any]]  # the final conversation: prompt + assistant turns + tool messages
    reply: Reply              # the parsed last assistant turn
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATS, 0))
    finish_reason: str = ""   # "answer" | "invalid_call" | "max_turns" | "length"

    @property
    def num_generated(self) -> int:
        """How many tokens the model sampled over all its turns."""
        return sum(self.generated)

    def add(self, ids: Sequence[int], sampled: bool) -> None:
        """Append token ids to the sequence, marked as sampled by the model or not."""
        self.ids.extend(ids)
        self.generated.extend([int(sampled)] * len(ids))


# --- pieces ---

def turn_seed(seed: int | None, turn: int, row: int) -> int | None:
    """The sampling seed of trajectory `row` at turn `turn` (>= 2): a pure function of the group's seed."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed % 2**64, turn, row]).generate_state(1)[0])


def generation_prompt(enable_thinking: bool | None) -> str:
    """What the template renders to open an assistant turn (render_prompt's last characters)."""
    return f"{IM_START_TOKEN}assistant\n" + GENERATION_THINKING[enable_thinking]


def tool_turn_text(responses: Sequence[str], enable_thinking: bool | None) -> str:
    """The text after an assistant turn's <|im_end|> that carries tool responses and opens the next
    assistant turn, as the chat template renders consecutive `tool` messages."""
    body = "".join(f"\n{TOOL_RESPONSE_START}\n{text}\n{TOOL_RESPONSE_END}" for text in responses)
    return f"\n{IM_START_TOKEN}user{body}{IM_END_TOKEN}\n" + generation_prompt(enable_thinking)


def accepts_example(function: Callable[..., Any]) -> bool:
    """Whether `function` has a parameter called `example` it can take by keyword."""
    try:
        parameter = inspect.signature(function).parameters.get("example")
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return parameter is not None and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)


def response_text(result: ToolResult) -> tuple[str, str | None]:
    """(the text the model reads, "error" | "timeout" | None) for one tool run. call_tool already
    writes failures as "error: ..." texts; a text holding a token of the chat layout is refused too."""
    failure = "timeout" if result.timed_out else "error" if result.error is not None else None
    if any(token in result.text for token in FORBIDDEN_IN_RESPONSES):  # (not named: it would be one)
        return "error: the tool's answer holds a token of the chat layout (such as an end of turn)", "error"
    return result.text, failure


def tool_schema(function: Callable[..., Any]) -> dict[str, Any]:
    """function_schema(function) without its `example` parameter, which the rollout fills in: the
    model is never asked for it (and, additionalProperties being false, may not pass it)."""
    schema = copy.deepcopy(function_schema(function))
    parameters = schema["function"]["parameters"]
    parameters["properties"].pop("example", None)
    parameters["required"] = [name for name in parameters["required"] if name != "example"]
    return schema


def run_calls(calls: Sequence[Mapping[str, Any]], functions: Mapping[str, Callable[..., Any]],
              example: dict[str, Any] | None, timeout_s: float, stats: dict[str, int]) -> list[str]:
    """Run each (valid) call's function and return the response texts, counting errors and timeouts."""
    responses = []
    for call in calls:
        function = functions[call["name"]]
        arguments = dict(call["arguments"])
        if accepts_example(function):
            arguments["example"] = example
        text, failure = response_text(call_tool(function, arguments, timeout_s))
        stats["tool_errors"] += failure == "error"
        stats["timeouts"] += failure == "timeout"
        responses.append(text)
    return responses


def sample_turns(model: Transformer, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 stop_ids: set[int]) -> list[tuple[list[int], bool]]:
    """`params.num_samples` continuations of one prompt: (ids, stopped) each, the ids ending with the
    stop token the model sampled when it stopped (so that token is trained too), cut otherwise.

    The stop tokens are watched here rather than in generate_batch, which would drop them: a trainer
    needs the very token the model chose (<|im_end|>, or <|endoftext|> from a model that skips it).
    """
    turns: list[list[int]] = [[] for _ in range(params.num_samples)]
    stopped = [False] * params.num_samples
    for step_tokens in generate_batch(model, prompt_ids, replace(params, stop_token_ids=[]), eos_ids=(),
                                      vocab_size=tokenizer.vocab_size):
        for row, token in enumerate(step_tokens):
            if not stopped[row] and token is not None:
                turns[row].append(token)
                stopped[row] = token in stop_ids
        if all(stopped):
            break
    return list(zip(turns, stopped))


# --- the rollout ---

def rollout_group(model: Transformer, tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], *,
                  tools: Sequence[dict[str, Any]], functions: Mapping[str, Callable[..., Any]],
                  params: SamplingParams, max_turns: int = 3, enable_thinking: bool | None = None,
                  example: dict[str, Any] | None = None, timeout_s: float = 2.0,
                  max_total_tokens: int | None = None) -> list[Trajectory]:
    """`params.num_samples` trajectories of one prompt, each up to `max_turns` assistant turns.

    `params.max_new_tokens` bounds each turn; `max_total_tokens` (default: the model's context) bounds
    a whole trajectory. `params.stop` strings are not applied (as in generate_batch); the stop tokens
    are <|im_end|>, <|endoftext|> and `params.stop_token_ids`. See the module docstring.
    """
    context = model.config.max_position_embeddings
    limit = min(max_total_tokens or context, context)
    names = tool_names(tools)
    missing = [name for name in names if name not in functions]
    if missing:
        raise ConfigError(f"no function for the tool(s) {missing}: pass them in functions= (name -> callable)")
    if max_turns < 1:
        raise ConfigError(f"max_turns must be >= 1, got {max_turns}")
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
    prompt_ids = render_prompt(tokenizer, messages, tools=tools, enable_thinking=enable_thinking)
    if len(prompt_ids) >= limit:
        raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, leaving no room to answer within "
                          f"{limit} (max_total_tokens / the model's context); drop or shorten it")
    stop_ids = {IM_END_ID, tokenizer.eot_id, *params.stop_token_ids}
    # what the prompt already opened (an empty think block, or "<think>\n"): part of the reply it continues
    reply_prefix = GENERATION_THINKING[enable_thinking]

    group = [Trajectory(ids=list(prompt_ids), prompt_length=len(prompt_ids), generated=[0] * len(prompt_ids),
                        messages=[dict(m) for m in messages], reply=Reply(""))
             for _ in range(params.num_samples)]
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        # turn 1: the whole group in one batch; later turns: the continuing trajectories one by one
        first = replace(params, max_new_tokens=min(params.max_new_tokens, limit - len(prompt_ids)))
        pending = list(enumerate(sample_turns(model, tokenizer, prompt_ids, first, stop_ids)))
        for turn in range(1, max_turns + 1):
            continuing = []
            for row, (turn_ids, stopped) in pending:
                trajectory = group[row]
                if take_turn(trajectory, tokenizer, turn_ids, stopped, reply_prefix, turn=turn, max_turns=max_turns,
                             tools=tools, functions=functions, example=example, timeout_s=timeout_s,
                             enable_thinking=enable_thinking, limit=limit):
                    continuing.append(row)
            pending = []
            for row in continuing:
                trajectory = group[row]
                budget = min(params.max_new_tokens, limit - len(trajectory.ids))
                turn_params = replace(params, num_samples=1, max_new_tokens=budget,
                                      seed=turn_seed(params.seed, turn + 1, row))
                pending.append((row, sample_turns(model, tokenizer, trajectory.ids, turn_params, stop_ids)[0]))
    finally:
        model.train(was_training)
    return group


def take_turn(trajectory: Trajectory, tokenizer: Tokenizer, turn_ids: list[int], stopped: bool, reply_prefix: str,
              *, turn: int, max_turns: int, tools: Sequence[dict[str, Any]],
              functions: Mapping[str, Callable[..., Any]], example: dict[str, Any] | None, timeout_s: float,
              enable_thinking: bool | None, limit: int) -> bool:
    """Record one sampled assistant turn; run its tool calls and append their responses when the
    trajectory goes on. Returns whether it goes on (another turn is to be sampled)."""
    stats = trajectory.stats
    trajectory.add(turn_ids, sampled=True)
    stats["turns"] += 1
    text = tokenizer.decode(turn_ids[:-1] if stopped else turn_ids)
    reply = parse_reply(reply_prefix + text, tools)
    trajectory.reply = reply
    trajectory.messages.append(reply.message())
    stats["tool_calls"] += text.count(TOOL_CALL_START)
    if not stopped:  # cut at a length limit: its calls are neither judged nor run
        trajectory.finish_reason, stats["truncated"] = "length", 1
        return False
    stats["valid_calls"] += len(reply.tool_calls)
    stats["invalid_calls"] += len(reply.problems)
    if reply.problems:
        trajectory.finish_reason = "invalid_call"
        return False
    if not reply.tool_calls:
        trajectory.finish_reason = "answer"
        return False
    if turn == max_turns:
        trajectory.finish_reason = "max_turns"
        return False
    responses = run_calls(reply.tool_calls, functions, example, timeout_s, stats)
    response_ids = tokenizer.encode(tool_turn_text(responses, enable_thinking))
    if len(trajectory.ids) + len(response_ids) >= limit:  # no room for the responses and one more token
        trajectory.finish_reason, stats["truncated"] = "length", 1
        return False
    trajectory.add(response_ids, sampled=False)
    trajectory.messages.extend({"role": "tool", "content": text} for text in responses)
    return True


def trajectory_tensors(trajectories: Sequence[Trajectory], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], targets [B, T]) for a trainer, T = the longest trajectory - 1.

    input_ids = ids[:-1] right-padded with `pad_id`; targets = ids[1:] where the model sampled that
    token, IGNORE_INDEX (-100) elsewhere (prompt, tool responses, padding), so the log-probabilities
    a trainer gathers are exactly those of the sampled tokens.
    """
    if not trajectories:
        raise ConfigError("no trajectories to stack")
    length = max(len(t.ids) for t in trajectories) - 1
    inputs = torch.full((len(trajectories), length), pad_id, dtype=torch.long)
    targets = torch.full((len(trajectories), length), IGNORE_INDEX, dtype=torch.long)
    for row, trajectory in enumerate(trajectories):
        ids = torch.tensor(trajectory.ids, dtype=torch.long)
        sampled = torch.tensor(trajectory.generated[1:], dtype=torch.bool)
        inputs[row, :len(ids) - 1] = ids[:-1]
        targets[row, :len(ids) - 1] = ids[1:].masked_fill(~sampled, IGNORE_INDEX)
    return inputs, targets
