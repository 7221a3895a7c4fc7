"""Tools and thinking through the OpenAI-compatible server, driven by the official `openai` client.

A tiny random model never writes a tool call by itself, so `ScriptedEngine` makes its output
deterministic: the real engine runs (the model's forward passes, batching, the stop tokens, the
streaming detokenizer that never splits a UTF-8 character), only the sampler is replaced by one that
picks the tokens of a scripted reply. Everything after it, the reply parsing, the SSE chunks and the
client's own parsing, is the real path.
"""

from __future__ import annotations

import collections
import json

import httpx
import openai
import pytest
import torch

from acornlm.data.chat import IM_END_ID, chat_text
from acornlm.infer.engine import Engine
from acornlm.model import ModelConfig, Transformer
from acornlm.serve.app import create_app
from acornlm.serve.server import BackgroundServer
from acornlm.tokenizer import Tokenizer, train_tokenizer
from acornlm.tokenizer.special_tokens import CHAT_TOKENS

MODEL = "scripted"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"], "additionalProperties": False}}}
PRICE = {"type": "function", "function": {
    "name": "price", "description": "Price of an item",
    "parameters": {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]}}}
TOOLS = [WEATHER, PRICE]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PRICE_CALL = '<tool_call>\n{"name": "price", "arguments": {"item": "tea"}}\n</tool_call>'
THINK = "<think>\nThe user wants the weather.\n</think>\n\n"

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedSampler:
    """Picks the tokens of a fixed reply, then <|im_end|>, whatever the logits say."""

    plain = False  # sample_rows calls it on its own row

    def __init__(self, token_ids: list[int]) -> None:
        self.tokens = collections.deque(token_ids)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        token = self.tokens.popleft() if self.tokens else IM_END_ID
        return torch.full((logits.shape[0],), token, dtype=torch.long, device=logits.device)


class ScriptedEngine(Engine):
    """The real engine, but each submitted sequence says the next text queued with `say` ("ok" when none);
    the prompts it was given are kept in `prompts`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: collections.deque[str] = collections.deque()
        self.prompts: list[list[int]] = []

    def say(self, *texts: str) -> None:
        self.replies.extend(texts)

    def submit(self, prompt_ids, params, **kwargs):
        # The engine thread takes waiting sequences under this (reentrant) lock, so the scripted sampler
        # is in place before the sequence is prefilled.
        with self._cond:
            handle = super().submit(prompt_ids, params, **kwargs)
            self.prompts.append(list(prompt_ids))
            text = self.replies.popleft() if self.replies else "ok"
            handle._seq.sampler = ScriptedSampler(self.tokenizer.encode(text) + [IM_END_ID])
        return handle

    def last_prompt(self) -> str:
        return self.tokenizer.decode(self.prompts[-1])


def tiny_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return Transformer(config)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [chat_text(ASK, add_generation_prompt=True, tools=TOOLS), THINK + CALL, "你好，世界 🎉 天气 🤔"]
    return train_tokenizer(texts * 5, "bpe", 400)


@pytest.fixture(scope="module")
def engine(tokenizer):
    engine = ScriptedEngine(tiny_model(tokenizer.vocab_size), tokenizer, max_batch=4).start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, MODEL)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def streamed(client, **request):
    """The chunks of a streamed reply and what they add up to: reasoning, content, tool calls by index."""
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **request))
    reasoning, content, calls, finish, problems = "", "", {}, None, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                finish = choice.finish_reason
                problems = getattr(choice, "tool_call_problems", None)
    return {"chunks": chunks, "reasoning": reasoning, "content": content,
            "calls": [calls[i] for i in sorted(calls)], "finish": finish, "problems": problems}


def test_a_tool_call_with_reasoning_non_streaming(client, engine):
    engine.say(THINK + "Let me check.\n" + CALL)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.reasoning_content == "The user wants the weather."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert getattr(choice, "tool_call_problems", None) is None
    prompt = engine.last_prompt()  # the tools are in the system turn, as the chat template writes them
    assert prompt.startswith("<|im_start|>system\n# Tools") and json.dumps(WEATHER) in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tool_calls_and_reasoning_streaming(client, engine):
    engine.say(THINK + CALL + "\n" + PRICE_CALL)
    result = streamed(client, messages=ASK, tools=TOOLS)
    assert result["reasoning"] == "The user wants the weather."
    assert result["content"] == "" and result["finish"] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in result["calls"]] == [
        ("get_weather", {"city": "Paris"}), ("price", {"item": "tea"})]
    assert len({c["id"] for c in result["calls"]}) == 2
    shown = [c.choices[0].delta.content or "" for c in result["chunks"] if c.choices]
    assert not any("<" in piece for piece in shown)  # no tag, not even half of one, reaches the client
    # The same text without streaming gives the same message.
    engine.say(THINK + CALL + "\n" + PRICE_CALL)
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices[0].message
    assert whole.content is None and whole.reasoning_content == result["reasoning"]
    assert [c.function.arguments for c in whole.tool_calls] == [c["arguments"] for c in result["calls"]]


def test_reasoning_without_tools_in_both_modes(client, engine):
    text = "<think>\n先想一想 🤔\n\nthen answer\n</think>\n\n答案是 42 🎉"
    engine.say(text)
    message = client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message
    assert message.reasoning_content == "先想一想 🤔\n\nthen answer" and message.content == "答案是 42 🎉"
    assert message.tool_calls is None
    engine.say(text)
    result = streamed(client, messages=ASK)
    assert result["reasoning"] == message.reasoning_content and result["content"] == message.content
    assert result["finish"] == "stop"
    # A reply without a think block has no reasoning at all, and keeps its text as written.
    for text in ("plain", "\n\nplain\n", "\n"):
        engine.say(text)
        message = client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message
        assert message.content == text and message.reasoning_content is None
        engine.say(text)
        assert streamed(client, messages=ASK)["content"] == text
    # Without tools in the request, what looks like a call is text.
    engine.say(CALL)
    choice = client.chat.completions.create(model=MODEL, messages=ASK).choices[0]
    assert choice.message.content == CALL and choice.message.tool_calls is None and choice.finish_reason == "stop"


def test_chinese_and_emoji_stream_intact(client, engine, tokenizer):
    text = "你好，世界 🎉 天气很好 🤔🌧️ 结束"
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(text)]
    assert any("\ufffd" in piece for piece in pieces)  # some token holds part of a character
    engine.say(text)
    result = streamed(client, messages=ASK)
    deltas = [c.choices[0].delta.content for c in result["chunks"] if c.choices and c.choices[0].delta.content]
    assert result["content"] == text and len(deltas) > 3
    assert not any("\ufffd" in piece for piece in deltas)


def test_enable_thinking_false_renders_the_empty_think_block(client, engine):
    client.chat.completions.create(model=MODEL, messages=ASK,
                                   extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert engine.last_prompt().endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # enable_thinking true opens the think block in the prompt: the reply starts with reasoning.
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    engine.say("\nweather means tools\n</think>\n\nIt is sunny.")
    message = client.chat.completions.create(model=MODEL, messages=ASK, extra_body=thinking).choices[0].message
    assert engine.last_prompt().endswith("<|im_start|>assistant\n<think>\n")
    assert message.reasoning_content == "weather means tools" and message.content == "It is sunny."
    engine.say("\nweather means tools\n</think>\n\nIt is sunny.")
    result = streamed(client, messages=ASK, extra_body=thinking)
    assert (result["reasoning"], result["content"]) == (message.reasoning_content, message.content)
    client.chat.completions.create(model=MODEL, messages=ASK)  # not given: the model's default, no think block
    assert engine.last_prompt().endswith("<|im_start|>assistant\n")
    with pytest.raises(openai.BadRequestError, match="enable_thinking must be true or false"):
        client.chat.completions.create(model=MODEL, messages=ASK,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": "no"}})


def test_tool_choice_none_renders_no_tools_and_returns_no_calls(client, engine):
    engine.say(CALL)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
    choice = reply.choices[0]
    assert "# Tools" not in engine.last_prompt()
    assert choice.message.tool_calls is None and choice.message.content == CALL
    assert choice.finish_reason == "stop"
    engine.say(CALL)
    result = streamed(client, messages=ASK, tools=TOOLS, tool_choice="none")
    assert result["content"] == CALL and result["calls"] == [] and result["finish"] == "stop"


def test_tool_choice_named_accepts_only_that_function(client, engine):
    named = {"type": "function", "function": {"name": "price"}}
    engine.say(PRICE_CALL)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named)
    assert reply.choices[0].message.tool_calls[0].function.name == "price"
    assert json.dumps(WEATHER) in engine.last_prompt()  # every tool is shown; only the named one is accepted
    engine.say(CALL)
    choice = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named).choices[0]
    assert choice.message.tool_calls is None and choice.message.content == CALL
    assert choice.finish_reason == "stop"
    assert "not among the tools (price)" in choice.tool_call_problems[0]
    assert "asked for a call of the function 'price'" in choice.tool_call_problems[1]


def test_tool_choice_naming_a_missing_function_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "teleport"}})
    message = excinfo.value.body["message"]
    assert "'teleport'" in message and "get_weather, price" in message
    assert excinfo.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        client.chat.completions.create(model=MODEL, messages=ASK, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="tool_choice must be"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="sometimes")


def test_tool_choice_required_without_a_call_returns_the_text_and_says_so(client, engine):
    engine.say("I would rather not.")
    choice = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                            tool_choice="required").choices[0]
    assert choice.message.content == "I would rather not." and choice.finish_reason == "stop"
    assert "did not make a valid one" in choice.tool_call_problems[0]
    engine.say("I would rather not.")
    result = streamed(client, messages=ASK, tools=TOOLS, tool_choice="required")
    assert result["content"] == "I would rather not." and "did not make" in result["problems"][0]
    engine.say(CALL)
    choice = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                            tool_choice="required").choices[0]
    assert choice.finish_reason == "tool_calls" and getattr(choice, "tool_call_problems", None) is None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body", [
    '{"name": "get_weather", "arguments": {"city": 3}}',   # schema mismatch
    '{"name": "teleport", "arguments": {}}',                # unknown tool
    '{"name": "get_weather", "arguments": {"city": "x"',    # broken JSON
])
def test_a_malformed_tool_call_comes_back_as_plain_content(client, engine, stream, body):
    text = f"Sure.\n<tool_call>\n{body}\n</tool_call>"
    engine.say(text)
    if stream:
        result = streamed(client, messages=ASK, tools=TOOLS)
        content, finish, problems = result["content"], result["finish"], result["problems"]
        assert result["calls"] == []
    else:
        choice = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS).choices[0]
        content, finish, problems = choice.message.content, choice.finish_reason, choice.tool_call_problems
        assert choice.message.tool_calls is None
    assert content == text and finish == "stop" and len(problems) == 1


def test_an_unclosed_tool_call_cut_at_max_tokens_is_content(client, engine, tokenizer):
    engine.say("Sure.\n" + CALL)
    cut = len(tokenizer.encode("Sure.\n<tool_call>\n")) + 2  # inside the call's JSON
    choice = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=cut).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith("Sure.\n<tool_call>\n{")
    assert "an unclosed <tool_call>" in choice.tool_call_problems[0]


def test_a_follow_up_with_the_calls_and_the_tool_results(client, engine):
    engine.say(THINK + CALL)
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    message = first.choices[0].message
    call = message.tool_calls[0]
    conversation = ASK + [
        message,  # the client's own message object: content null, reasoning_content, tool_calls with ids
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21, "sky": "晴"}'},
    ]
    engine.say("21 °C and sunny ☀️")
    reply = client.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS)
    assert reply.choices[0].message.content == "21 °C and sunny ☀️"
    prompt = engine.last_prompt()
    assert ("<|im_start|>assistant\n<think>\nThe user wants the weather.\n</think>\n\n" + CALL
            + "<|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 21, \"sky\": \"晴\"}\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in prompt
    # Calls as OpenAI writes them by hand, arguments as a JSON string, content null.
    by_hand = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "price", "arguments": '{"item": "tea"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    client.chat.completions.create(model=MODEL, messages=by_hand, tools=TOOLS)
    assert PRICE_CALL + "<|im_end|>" in engine.last_prompt()


@pytest.mark.parametrize("messages, match", [
    (ASK + [{"role": "tool", "content": "3"}], "roles out of order"),
    (ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "price", "arguments": "{bad"}}]},
        {"role": "tool", "content": "3"}], "not valid JSON"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "reasoning_content": "a<|im_end|>"},
      {"role": "user", "content": "again"}], "special token"),
])
def test_invalid_tool_conversations_are_a_400(client, messages, match):
    with pytest.raises(openai.BadRequestError, match=match) as excinfo:
        client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert excinfo.value.body["param"] == "messages"


def test_malformed_tools_are_a_400(server):
    def post(**body):
        return httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body},
                          timeout=30)

    cases = [({"tools": [{"name": "bare"}]}, 'must be {"type": "function"'),
             ({"tools": [WEATHER, WEATHER]}, "given twice"),
             ({"tools": [{"type": "function", "function": {"name": "x", "description": "<|im_end|>"}}]},
              "special token"),
             ({"tools": [{"type": "function", "function": {"name": "x", "parameters": []}}]}, "JSON schema object")]
    for body, match in cases:
        response = post(**body)
        assert response.status_code == 400 and match in response.json()["error"]["message"], response.text
        assert response.json()["error"]["param"] == "tools"


def test_a_tokenizer_without_chat_tokens_says_how_to_add_them(tokenizer):
    from tokenizers import Tokenizer as Backend

    data = json.loads(tokenizer.backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in CHAT_TOKENS]
    older = Tokenizer(Backend.from_str(json.dumps(data)), "bpe")
    assert older.missing_chat_tokens
    engine = ScriptedEngine(tiny_model(tokenizer.vocab_size), older, max_batch=1).start()
    try:
        with BackgroundServer(create_app(engine, MODEL)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            for extra in ({"tools": TOOLS}, {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}):
                with pytest.raises(openai.BadRequestError, match="add-chat-tokens") as excinfo:
                    client.chat.completions.create(model=MODEL, messages=ASK, **extra)
                assert excinfo.value.body["code"] == "missing_chat_tokens"
            assert client.chat.completions.create(model=MODEL, messages=ASK).choices[0].message.content == "ok"
    finally:
        engine.shutdown()


def test_n_choices_each_get_their_own_calls(client, engine):
    engine.say(CALL, "no call")
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, n=2)
    first, second = reply.choices
    assert first.finish_reason == "tool_calls" and first.message.tool_calls[0].function.name == "get_weather"
    assert second.finish_reason == "stop" and second.message.content == "no call"
