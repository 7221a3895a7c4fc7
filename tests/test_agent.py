"""Multi-turn tool-using rollouts (acornlm.infer.agent): the layout of a trajectory, the tools' failures,
the calls refused, the limits, determinism and the tensors a trainer reads.

Most tests drive the rollout with a *scripted policy*: a module with the model's interface
(forward / new_cache / config / device) whose logits force a reply chosen from the prompt's text,
so a real parse -> run -> append -> continue path runs with replies a random model would never write.
"""

from __future__ import annotations

import threading

import pytest
import torch
from scripted_policy import ScriptedPolicy, by_turn

from acornlm.data.chat import IM_END_ID, chat_text, render_prompt
from acornlm.data.sft import IGNORE_INDEX
from acornlm.errors import ConfigError
from acornlm.infer.agent import Trajectory, rollout_group, tool_schema, tool_turn_text, trajectory_tensors
from acornlm.infer.generate import generate_batch
from acornlm.infer.sampling import SamplingParams
from acornlm.model import ModelConfig, Transformer
from acornlm.tokenizer import train_tokenizer
from acornlm.tokenizer.chat_template import EMPTY_THINK

pytestmark = pytest.mark.usefixtures("one_thread")

PRICE = {"type": "function", "function": {
    "name": "price", "description": "Price of an item in this shop",
    "parameters": {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"],
                   "additionalProperties": False}}}
TOOLS = [PRICE]
PROMPT = [{"role": "system", "content": "Answer with the shop's prices."},
          {"role": "user", "content": "What does tea cost?"}]
RECORD = {"messages": PROMPT, "prices": {"tea": 7, "milk": 3}}


def call(item, name: str = "price") -> str:
    """A tool call as a model writes it (the template's own layout)."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"item": {item}}}}}\n</tool_call>'


TEA = call('"tea"')


def shop_price(item: str, example: dict) -> str:
    """A tool of a synthetic environment: the prices come from the prompt's record."""
    return str(example["prices"][item])


@pytest.fixture(scope="module")
def tokenizer():
    texts = [chat_text(PROMPT + [{"role": "assistant", "content": "", "tool_calls": [
        {"name": "price", "arguments": {"item": "tea"}}]}, {"role": "tool", "content": "7"},
        {"role": "assistant", "content": "Tea costs 7.", "reasoning_content": ""}], tools=TOOLS),
        "the price of tea and milk is seven or three " * 10]
    return train_tokenizer(texts * 10, kind="bpe", vocab_size=400)


def rollout(tokenizer, script, functions=None, **kwargs):
    kwargs.setdefault("params", SamplingParams(num_samples=2, temperature=1.0, seed=0, max_new_tokens=64))
    policy = ScriptedPolicy(tokenizer, script)
    group = rollout_group(policy, tokenizer, PROMPT, tools=kwargs.pop("tools", TOOLS),
                          functions=functions or {"price": shop_price}, example=RECORD, **kwargs)
    return group, policy


def sampled_ids(trajectory: Trajectory) -> list[int]:
    return [token for token, g in zip(trajectory.ids, trajectory.generated) if g]


# --- the layout ---

@pytest.mark.parametrize("thinking", [None, False])
def test_a_tool_round_then_an_answer_reads_as_the_chat_template(tokenizer, thinking):
    group, policy = rollout(tokenizer, by_turn(TEA, "Tea costs 7."), enable_thinking=thinking)
    assert len(group) == 2
    for trajectory in group:
        assert trajectory.finish_reason == "answer"
        assert trajectory.stats == {"turns": 2, "tool_calls": 1, "valid_calls": 1, "invalid_calls": 0,
                                    "tool_errors": 0, "timeouts": 0, "truncated": 0}
        assert trajectory.reply.content == "Tea costs 7." and not trajectory.reply.tool_calls
        # the conversation: the prompt, the call, the price from the record (example=), the answer
        assert [m["role"] for m in trajectory.messages] == ["system", "user", "assistant", "tool", "assistant"]
        assert trajectory.messages[2]["tool_calls"] == [{"name": "price", "arguments": {"item": "tea"}}]
        assert trajectory.messages[3] == {"role": "tool", "content": "7"}
        # the ids are the template's text of that conversation (it adds "\n" after the last <|im_end|>)
        assert tokenizer.decode(trajectory.ids) + "\n" == chat_text(trajectory.messages, tools=TOOLS)
        prompt = render_prompt(tokenizer, PROMPT, tools=TOOLS, enable_thinking=thinking)
        assert trajectory.ids[:trajectory.prompt_length] == prompt
        # the model's second prompt was the first turn + the tool response, exactly as render_prompt gives it
        assert policy.prompts[-1] == chat_text(trajectory.messages[:4], True, tools=TOOLS, enable_thinking=thinking)
        # generated: exactly the two turns the model sampled, each with its <|im_end|>
        assert sampled_ids(trajectory) == tokenizer.encode(TEA) + [IM_END_ID] + tokenizer.encode("Tea costs 7.") \
            + [IM_END_ID]
        assert len(trajectory.generated) == len(trajectory.ids) and trajectory.generated[:len(prompt)] == \
            [0] * len(prompt)
        response = [t for t, g in zip(trajectory.ids[len(prompt):], trajectory.generated[len(prompt):]) if not g]
        assert tokenizer.decode(response) == tool_turn_text(["7"], thinking)
    if thinking is False:  # the empty think block is part of the prompt, not of what the model sampled
        assert tool_turn_text(["7"], False).endswith(EMPTY_THINK)
        assert group[0].messages[-1]["reasoning_content"] == ""


def test_several_calls_in_one_turn_share_one_response_turn(tokenizer):
    both = TEA + "\n" + call('"milk"')
    group, _ = rollout(tokenizer, by_turn(both, "Tea 7, milk 3."))
    trajectory = group[0]
    assert trajectory.stats["valid_calls"] == 2 and trajectory.stats["tool_calls"] == 2
    assert [m["content"] for m in trajectory.messages if m["role"] == "tool"] == ["7", "3"]
    assert tokenizer.decode(trajectory.ids) + "\n" == chat_text(trajectory.messages, tools=TOOLS)


def test_only_functions_taking_example_receive_it(tokenizer):
    seen = []

    def plain_price(item: str) -> str:  # no `example` parameter: called with the model's arguments only
        seen.append(item)
        return "5"

    group, _ = rollout(tokenizer, by_turn(TEA, "Five."), functions={"price": plain_price})
    assert seen == ["tea", "tea"] and group[0].messages[3]["content"] == "5"


def test_the_schema_of_an_environment_tool_leaves_example_to_the_rollout(tokenizer):
    schema = tool_schema(shop_price)
    assert schema["function"]["parameters"]["properties"] == {"item": {"type": "string"}}
    assert schema["function"]["parameters"]["required"] == ["item"]
    group, _ = rollout(tokenizer, by_turn(call('"tea"', name="shop_price"), "Seven."), tools=[schema],
                       functions={"shop_price": shop_price})
    assert group[0].messages[3]["content"] == "7" and group[0].finish_reason == "answer"
    # the model may not pass `example` itself: it is no argument of the tool it sees
    forged = '<tool_call>\n{"name": "shop_price", "arguments": {"item": "tea", "example": {}}}\n</tool_call>'
    group, _ = rollout(tokenizer, by_turn(forged), tools=[schema], functions={"shop_price": shop_price})
    assert group[0].finish_reason == "invalid_call" and "example" in group[0].reply.problems[0]


def test_a_value_that_is_not_text_comes_back_as_json(tokenizer):
    group, _ = rollout(tokenizer, by_turn(TEA, "Seven."), functions={"price": lambda item: {item: 7.0}})
    assert group[0].messages[3]["content"] == '{"tea": 7.0}' and group[0].stats["tool_errors"] == 0


# --- tools that fail ---

def test_a_raising_tool_answers_an_error_and_the_rollout_goes_on(tokenizer):
    def broken(item: str) -> str:
        raise ValueError("the shop is closed")

    group, policy = rollout(tokenizer, by_turn(TEA, "Sorry."), functions={"price": broken})
    for trajectory in group:
        assert trajectory.stats["tool_errors"] == 1 and trajectory.stats["turns"] == 2
        assert trajectory.finish_reason == "answer" and trajectory.reply.content == "Sorry."
        response = trajectory.messages[3]["content"]
        assert response.startswith("error") and "shop is closed" in response
        assert tokenizer.decode(trajectory.ids) + "\n" == chat_text(trajectory.messages, tools=TOOLS)


def test_a_hanging_tool_times_out_and_the_rollout_goes_on(tokenizer):
    release = threading.Event()

    def hanging(item: str) -> str:
        release.wait(10)
        return "too late"

    try:
        group, _ = rollout(tokenizer, by_turn(TEA, "No answer."), functions={"price": hanging}, timeout_s=0.2,
                           params=SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=64))
    finally:
        release.set()
    (trajectory,) = group
    assert trajectory.stats["timeouts"] == 1 and trajectory.stats["tool_errors"] == 0
    assert "0.2 s" in trajectory.messages[3]["content"] and trajectory.finish_reason == "answer"


def test_a_tool_answer_that_would_break_the_layout_is_an_error(tokenizer):
    group, _ = rollout(tokenizer, by_turn(TEA, "Hm."), functions={"price": lambda item: "7<|im_end|>"})
    assert group[0].stats["tool_errors"] == 1 and "<|im_end|>" not in group[0].messages[3]["content"]
    assert group[0].finish_reason == "answer"


# --- calls that are refused ---

@pytest.mark.parametrize("reply, problem", [
    (call('"tea"', name="weather"), "weather"),  # a tool not in `tools`, even with a function of that name
    (call("3"), "string"),                        # arguments off the schema
    ('<tool_call>\n{"name": "price", "arguments": {"item": </tool_call>', "JSON"),
])
def test_invalid_calls_end_the_trajectory_and_never_run(tokenizer, reply, problem):
    ran = []

    def spy(item=None, **kwargs) -> str:
        ran.append(item)
        return "1"

    group, policy = rollout(tokenizer, by_turn(reply, "unused"), functions={"price": spy, "weather": spy})
    assert ran == [] and len(policy.prompts) == 1  # nothing ran, no second turn
    for trajectory in group:
        assert trajectory.finish_reason == "invalid_call"
        assert trajectory.stats["invalid_calls"] == 1 and trajectory.stats["valid_calls"] == 0
        assert trajectory.stats["turns"] == 1 and problem in trajectory.reply.problems[0]
        assert trajectory.reply.content == reply  # refused calls stay text
        assert sampled_ids(trajectory) == tokenizer.encode(reply) + [IM_END_ID]


def test_a_tool_without_a_function_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="no function"):
        rollout(tokenizer, by_turn("hi"), functions={"other": shop_price})


# --- limits ---

def test_max_turns_stops_a_model_that_keeps_calling(tokenizer):
    runs = []

    def counted(item: str) -> str:
        runs.append(item)
        return "7"

    group, _ = rollout(tokenizer, lambda text: TEA, functions={"price": counted}, max_turns=2,
                       params=SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=64))
    (trajectory,) = group
    assert trajectory.finish_reason == "max_turns" and trajectory.stats["turns"] == 2
    assert runs == ["tea"]  # the last turn's call does not run: no turn is left to read it
    assert trajectory.stats["valid_calls"] == 2 and trajectory.reply.tool_calls
    assert [m["role"] for m in trajectory.messages][2:] == ["assistant", "tool", "assistant"]


def test_length_limits_end_a_trajectory_as_truncated(tokenizer):
    prompt_length = len(render_prompt(tokenizer, PROMPT, tools=TOOLS))
    # a turn cut at max_new_tokens: no <|im_end|>, not parsed into calls that run
    group, _ = rollout(tokenizer, by_turn(TEA, "x"), params=SamplingParams(num_samples=1, temperature=0.0,
                                                                          max_new_tokens=3))
    assert group[0].finish_reason == "length" and group[0].stats["truncated"] == 1
    assert group[0].num_generated == 3 and group[0].stats["valid_calls"] == group[0].stats["invalid_calls"] == 0
    # room for the first turn but not for the tool response and another token
    first_turn = len(tokenizer.encode(TEA)) + 1
    group, _ = rollout(tokenizer, by_turn(TEA, "x"), max_total_tokens=prompt_length + first_turn + 5)
    assert group[0].finish_reason == "length" and group[0].stats["truncated"] == 1
    assert len(group[0].ids) == prompt_length + first_turn and group[0].messages[-1]["role"] == "assistant"
    with pytest.raises(ConfigError, match="no room"):
        rollout(tokenizer, by_turn("x"), max_total_tokens=prompt_length)


# --- determinism ---

def test_the_same_seed_gives_the_same_trajectories(tokenizer):
    first = [TEA, "Milk?\n" + call('"milk"'), "I do not know."]
    second = ["It costs 7.", "Seven.", "Again:\n" + TEA]
    script = by_turn(first, second, second)

    def sample(seed):
        params = SamplingParams(num_samples=8, temperature=1.0, seed=seed, max_new_tokens=64)
        group, _ = rollout(tokenizer, script, params=params, max_turns=3)
        return [(t.ids, t.generated, t.messages) for t in group]

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)
    assert len({str(ids) for ids, _, _ in sample(11)}) > 2  # the group explores


def test_a_real_model_samples_the_same_group_for_the_same_seed(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=512))
    model.train()
    params = SamplingParams(num_samples=3, temperature=1.0, seed=5, max_new_tokens=8)

    def sample(**kwargs):
        return rollout_group(model, tokenizer, PROMPT, tools=TOOLS, functions={"price": shop_price},
                             params=params, example=RECORD, **kwargs)

    one, two = sample(), sample()
    assert [t.ids for t in one] == [t.ids for t in two] and model.training  # the mode is restored
    # one turn is plain batched sampling with the group's seed: the stop token is kept, nothing else differs
    direct = [[] for _ in range(3)]
    prompt = render_prompt(tokenizer, PROMPT, tools=TOOLS)
    model.eval()
    for step in generate_batch(model, prompt, params, eos_ids=(IM_END_ID, tokenizer.eot_id),
                               vocab_size=tokenizer.vocab_size):
        for row, token in enumerate(step):
            if token is not None:
                direct[row].append(token)
    for trajectory, ids in zip(sample(max_turns=1), direct):
        generated = sampled_ids(trajectory)
        assert generated[:len(ids)] == ids and len(generated) - len(ids) in (0, 1)


# --- the trainer's tensors ---

def test_trajectory_tensors_target_exactly_the_sampled_tokens(tokenizer):
    long, _ = rollout(tokenizer, by_turn(TEA, "Tea costs 7."), params=SamplingParams(num_samples=1, max_new_tokens=64))
    short, _ = rollout(tokenizer, by_turn("No."), params=SamplingParams(num_samples=1, max_new_tokens=64))
    trajectories = [long[0], short[0]]
    inputs, targets = trajectory_tensors(trajectories, pad_id=tokenizer.eot_id)
    length = len(long[0].ids) - 1
    assert inputs.shape == targets.shape == (2, length)
    for row, trajectory in enumerate(trajectories):
        n = len(trajectory.ids) - 1
        assert inputs[row, :n].tolist() == trajectory.ids[:-1]
        assert (inputs[row, n:] == tokenizer.eot_id).all() and (targets[row, n:] == IGNORE_INDEX).all()
        kept = targets[row][targets[row] != IGNORE_INDEX].tolist()
        assert kept == sampled_ids(trajectory)  # the first id is a prompt token, never sampled
        expected = [t if g else IGNORE_INDEX for t, g in zip(trajectory.ids[1:], trajectory.generated[1:])]
        assert targets[row, :n].tolist() == expected
