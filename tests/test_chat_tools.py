"""The chat template with tools and thinking: parity with transformers, masks by hand, the data formats
that carry tool calls and reasoning, and parsing what a model writes."""

from __future__ import annotations

import json

import pytest

from acornlm.data.chat import chat_text, message_problem, render_chat, render_prompt
from acornlm.data.conversations import load_conversations
from acornlm.data.tools import ReplyStreamParser, parse_reply, schema_problem, tool_call_problem
from acornlm.errors import ConfigError, DataError
from acornlm.tokenizer import train_tokenizer
from acornlm.tokenizer.chat_template import CHAT_TEMPLATE, render_segments
from acornlm.tokenizer.special_tokens import CHAT_TOKENS

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "今天的天气 (weather) for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"], "additionalProperties": False}}}
PRICE = {"name": "price", "description": "Price of an item", "parameters": {
    "type": "object", "properties": {"item": {"type": "string"}, "count": {"type": "integer"}}, "required": ["item"]}}
TOOLS = [WEATHER, PRICE]

TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in 北京, and the price of 2 teas?"},
    {"role": "assistant", "content": "", "reasoning_content": "I need two tools.",
     "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}},
                    {"type": "function", "function": {"name": "price", "arguments": '{"item": "tea", "count": 2}'}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "tool", "content": "14"},
    {"role": "assistant", "content": "21 °C, and 14 🙂."},
]
THINKING_CHAT = [
    {"role": "user", "content": "12 + 30?"},
    {"role": "assistant", "content": "42", "reasoning_content": "\n12 + 30 = 42\n"},
    {"role": "user", "content": "And 1 + 1?"},
    {"role": "assistant", "content": "2", "reasoning_content": ""},  # the empty block: "no thinking"
    {"role": "user", "content": "Inline?"},
    {"role": "assistant", "content": "<think>\nsplit me\n</think>\n\nyes"},
]
SPEAK_AND_CALL = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "price", "arguments": {"item": "x"}}]},
    {"role": "tool", "content": "3"},
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    texts = [chat_text(TOOL_CHAT, tools=TOOLS), chat_text(THINKING_CHAT), "the quick brown fox " * 20]
    tokenizer = train_tokenizer(texts * 10, kind="bpe", vocab_size=400)
    directory = tmp_path_factory.mktemp("bpe")
    tokenizer.save(directory)
    return tokenizer, directory


@pytest.fixture(scope="module")
def hf_tokenizer(bpe):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(bpe[1]))


CASES = [(TOOL_CHAT, TOOLS), (THINKING_CHAT, None), (SPEAK_AND_CALL, [PRICE]), (TOOL_CHAT[1:3], TOOLS),
         ([{"role": "user", "content": "hi"}], TOOLS)]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("generation", [None, True, False])
def test_template_text_and_ids_equal_transformers(bpe, hf_tokenizer, case, generation):
    """Our Python renderer and the Jinja template in tokenizer_config.json agree, tools and thinking included."""
    tokenizer, _ = bpe
    messages, tools = CASES[case]
    kwargs = {} if generation is None else {"enable_thinking": generation}
    add_prompt = generation is not None or messages[-1]["role"] != "assistant"
    expected = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                add_generation_prompt=add_prompt, **kwargs)
    assert chat_text(messages, add_prompt, tools=tools, enable_thinking=generation) == expected
    ids = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=add_prompt,
                                           **kwargs)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert render_chat(tokenizer, messages, add_prompt, tools=tools, enable_thinking=generation).ids == list(ids)
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE


def test_rendered_layout_is_qwen3s():
    text = chat_text(TOOL_CHAT, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions")
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(PRICE, ensure_ascii=False) \
        + "\n</tools>" in text
    assert ("<|im_start|>assistant\n<think>\nI need two tools.\n</think>\n\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n<tool_call>\n'
            '{"name": "price", "arguments": {"item": "tea", "count": 2}}\n</tool_call><|im_end|>\n') in text
    assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n14\n"
            "</tool_response><|im_end|>\n") in text
    thinking = chat_text(THINKING_CHAT)
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n2<|im_end|>" in thinking
    assert "<|im_start|>assistant\n<think>\nsplit me\n</think>\n\nyes<|im_end|>" in thinking
    assert chat_text(THINKING_CHAT[:1], True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat_text(THINKING_CHAT[:1], True, enable_thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    assert chat_text(THINKING_CHAT[:1], True).endswith("<|im_start|>assistant\n")


def test_loss_mask_by_hand_with_a_char_tokenizer():
    """One token per character (and per chat token): the mask is written out by hand."""
    tok = train_tokenizer([chat_text(TOOL_CHAT, tools=TOOLS) + chat_text(THINKING_CHAT)], kind="char",
                          vocab_size=400)
    rendered = render_chat(tok, TOOL_CHAT, tools=TOOLS)
    decoded = [tok.decode([i]) for i in rendered.ids]
    trained = "".join(piece for piece, m in zip(decoded, rendered.loss_mask) if m)
    first = ('<think>\nI need two tools.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "北京"}}\n</tool_call>\n<tool_call>\n{"name": "price", "arguments": '
             '{"item": "tea", "count": 2}}\n</tool_call><|im_end|>')
    assert trained == first + "21 °C, and 14 🙂.<|im_end|>"
    untrained = "".join(piece for piece, m in zip(decoded, rendered.loss_mask) if not m)
    for never in ("# Tools", "Be brief.", "<tool_response>", '{"temp": 21}', "Weather in 北京"):
        assert never in untrained and never not in trained
    for token in CHAT_TOKENS[:4]:  # each chat token is one id
        assert tok.token_to_id(token) in rendered.ids


def test_segments_mark_only_assistant_bodies():
    segments = render_segments(SPEAK_AND_CALL, [PRICE])
    assert [s.text for s in segments if s.trained] == [
        'Let me check.\n<tool_call>\n{"name": "price", "arguments": {"item": "x"}}\n</tool_call><|im_end|>']


def test_thinking_with_a_tokenizer_without_chat_tokens_says_how_to_add_them():
    old = train_tokenizer(["hello there " * 30], kind="bpe", vocab_size=270)
    backend_json = json.loads(old.backend.to_str())  # an older tokenizer: drop the chat tokens
    backend_json["added_tokens"] = [t for t in backend_json["added_tokens"] if t["content"] not in CHAT_TOKENS]
    from tokenizers import Tokenizer as Backend

    from acornlm.tokenizer import Tokenizer
    older = Tokenizer(Backend.from_str(json.dumps(backend_json)), "bpe")
    assert older.missing_chat_tokens == list(CHAT_TOKENS)
    with pytest.raises(ConfigError, match="add-chat-tokens"):
        render_prompt(older, [{"role": "user", "content": "hi"}], enable_thinking=False)
    with pytest.raises(ConfigError, match="tool calls needs the chat tokens"):
        render_chat(older, SPEAK_AND_CALL, tools=[PRICE])
    assert render_prompt(older, [{"role": "user", "content": "hi"}])  # plain chat still works


def test_message_problems_with_tools():
    assert message_problem(TOOL_CHAT) is None and message_problem(SPEAK_AND_CALL, need_assistant=False) is None
    no_calls = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "tool", "content": "c"}]
    assert message_problem(no_calls).startswith("roles out of order")
    bad_call = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{oops"}]}]
    assert "not valid JSON" in message_problem(bad_call)
    assert "reasoning_content" in message_problem([{"role": "user", "content": "a", "reasoning_content": "x"}])


# --- data formats ---

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


EXPECTED_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Price of tea?"},
    {"role": "assistant", "content": "", "reasoning_content": "Look it up.",
     "tool_calls": [{"name": "price", "arguments": {"item": "tea"}}]},
    {"role": "tool", "content": "7"},
    {"role": "assistant", "content": "Tea costs 7."},
]


def test_openai_minimind_and_sharegpt_tool_rows_parse_to_one_shape(tmp_path):
    openai = {"tools": [{"type": "function", "function": PRICE}], "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Price of tea?"},
        {"role": "assistant", "content": None, "reasoning_content": "Look it up.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "price", "arguments": "{\"item\": \"tea\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7"},
        {"role": "assistant", "content": "Tea costs 7."}]}
    minimind = {"conversations": [
        {"role": "system", "content": "Be brief.", "tools": json.dumps([PRICE])},
        {"role": "user", "content": "Price of tea?"},
        {"role": "assistant", "content": "<think>\nLook it up.\n</think>\n\n",
         "tool_calls": json.dumps([{"name": "price", "arguments": {"item": "tea"}}])},
        {"role": "tool", "content": "7"},
        {"role": "assistant", "content": "Tea costs 7."}]}
    sharegpt = {"system": "Be brief.", "tools": json.dumps([PRICE]), "conversations": [
        {"from": "human", "value": "Price of tea?"},
        {"from": "function_call", "value": json.dumps({"name": "price", "arguments": {"item": "tea"}})},
        {"from": "observation", "value": "7"},
        {"from": "gpt", "value": "Tea costs 7."}]}
    for name, record in (("openai", openai), ("minimind", minimind), ("sharegpt", sharegpt)):
        conversations, stats = load_conversations(write_jsonl(tmp_path / f"{name}.jsonl", [record]))
        assert stats.skipped == 0, (name, stats.problems)
        messages = conversations[0].messages
        expected = EXPECTED_MESSAGES if name != "sharegpt" else [
            m if m["role"] != "assistant" or "tool_calls" not in m else
            {"role": "assistant", "content": "", "tool_calls": m["tool_calls"]} for m in EXPECTED_MESSAGES]
        assert messages == expected, name
        tools = conversations[0].tools
        assert [t.get("function", t)["name"] for t in tools] == ["price"]


def test_a_minimind_file_with_tool_and_reasoning_rows_trains_without_skipping_them(tmp_path):
    import torch

    from acornlm.model import ModelConfig, Transformer
    from acornlm.model.checkpoint import write_model_files
    from acornlm.train.config import TrainConfig
    from acornlm.train.sft import run_sft

    rows = [
        {"conversations": [{"role": "user", "content": "1+1?"},
                           {"role": "assistant", "content": "2", "reasoning_content": "one and one"}]},
        {"conversations": [{"role": "system", "content": "", "tools": json.dumps([PRICE])},
                           {"role": "user", "content": "tea?"},
                           {"role": "assistant", "content": "", "tool_calls": json.dumps(
                               [{"name": "price", "arguments": {"item": "tea"}}])},
                           {"role": "tool", "content": "7"}, {"role": "assistant", "content": "7"}]},
    ] * 4
    data = write_jsonl(tmp_path / "mm.jsonl", rows)
    conversations, stats = load_conversations(data)
    assert (stats.kept, stats.skipped) == (8, 0)
    tok = train_tokenizer([chat_text(c.messages, tools=c.tools) for c in conversations] * 5, "char", 200)
    rendered = render_chat(tok, conversations[1].messages, tools=conversations[1].tools)
    trained = tok.decode([i for i, m in zip(rendered.ids, rendered.loss_mask) if m])
    assert trained == ('<tool_call>\n{"name": "price", "arguments": {"item": "tea"}}\n</tool_call><|im_end|>'
                       "7<|im_end|>")
    tok.save(tmp_path / "tok")
    torch.manual_seed(0)
    (tmp_path / "init").mkdir()
    write_model_files(tmp_path / "init", Transformer(ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=1024)), {"stage": "test"}, tokenizer_dir=tmp_path / "tok")
    summary = run_sft(data, tmp_path / "init", tmp_path / "sft", TrainConfig(
        max_steps=2, batch_size=2, seq_len=1023, warmup_steps=1, eval_interval=0, eval_batches=1, save_interval=0,
        log_interval=1, progress=False), val_fraction=0.25)
    assert summary["data"]["load"]["kept"] == 8 and summary["data"]["load"]["bad_roles"] == 0
    assert summary["data"]["encode"]["dropped_too_long"] == 0 and summary["steps"] == 2


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "",
                                                      "tool_calls": "[{oops"}]}, "tool calls are not valid JSON"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{nope"}}]}]}, "arguments of 'f' are not valid JSON"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "{bad"},
     "'tools' is not valid JSON"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "not json"}]},
     "tool calls are not valid JSON"),
])
def test_malformed_tool_json_names_the_file_and_line(tmp_path, bad, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    fmt = "sharegpt" if "conversations" in bad else "messages"
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad] if fmt == "messages" else [bad])
    line = 2 if fmt == "messages" else 1
    with pytest.raises(DataError, match=f"d.jsonl:{line}.*{message}"):
        load_conversations(path, fmt)


# --- what the model writes ---

def test_parse_reply_splits_thinking_answer_and_valid_calls():
    text = ('<think>\nneed the weather\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>')
    reply = parse_reply(text, TOOLS)
    assert reply.reasoning_content == "need the weather" and reply.content == "" and not reply.problems
    assert reply.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert parse_reply("Just text.", TOOLS).content == "Just text."
    assert parse_reply("<think>\ncut off while thinking").reasoning_content == "cut off while thinking"
    continued = parse_reply("12 + 30\n</think>\n\n42", in_thinking=True)  # the prompt opened the block
    assert (continued.reasoning_content, continued.content) == ("12 + 30", "42")


@pytest.mark.parametrize("body, problem", [
    ('{"name": "teleport", "arguments": {}}', "not among the tools"),
    ('{"name": "get_weather", "arguments": {"town": "x"}}', "lacks the required 'city'"),
    ('{"name": "get_weather", "arguments": {"city": 3}}', "arguments.city must be string"),
    ('{"name": "get_weather", "arguments": {"city": "x", "unit": "K"}}', "must be one of"),
    ('{"name": "get_weather", "arguments": {"city": "x", "when": 1}}', "does not allow"),
    ('{"name": "get_weather", "arguments": {"city": "x"', "not valid JSON"),
])
def test_an_invalid_call_stays_plain_content_with_its_problem(body, problem):
    text = f"Sure.\n<tool_call>\n{body}\n</tool_call>"
    reply = parse_reply(text, TOOLS)
    assert reply.tool_calls == [] and reply.content == text
    assert problem in reply.problems[0]


def test_schema_subset():
    assert schema_problem({"count": True}, PRICE["parameters"]) == "arguments lacks the required 'item'"
    assert "must be integer" in schema_problem({"item": "a", "count": True}, PRICE["parameters"])
    assert schema_problem([1, 2], {"type": "array", "items": {"type": "number"}}) is None
    assert tool_call_problem({"name": "anything", "arguments": {}}, None) is None


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_stream_parser_equals_the_whole_reply_and_never_shows_half_a_tag(chunk):
    text = ('<think>\nfirst I think\n</think>\n\nThe answer is near.\n<tool_call>\n'
            '{"name": "price", "arguments": {"item": "tea"}}\n</tool_call>')
    parser = ReplyStreamParser(TOOLS)
    events = [event for i in range(0, len(text), chunk) for event in parser.feed(text[i:i + chunk])]
    reply, rest = parser.finish()
    reasoning = "".join(t for kind, t in events if kind == "reasoning")
    content = "".join(t for kind, t in events if kind == "content") + rest
    assert reasoning == "first I think"
    assert content.strip("\n") == "The answer is near."
    assert all("<" not in t for _, t in events)
    assert reply.tool_calls == [{"name": "price", "arguments": {"item": "tea"}}]


@pytest.mark.parametrize("chunk", [1, 2, 1000])
@pytest.mark.parametrize("text", ["\n\nStarts with newlines.\n", "No </think> here, it is just text.", "\n", "<thinking?"])
def test_a_plain_answer_streams_exactly_as_written(chunk, text):
    parser = ReplyStreamParser()
    events = [event for i in range(0, len(text), chunk) for event in parser.feed(text[i:i + chunk])]
    reply, rest = parser.finish()
    assert "".join(t for kind, t in events if kind == "content") + rest == text == reply.content
    assert reply.reasoning_content is None and not any(kind == "reasoning" for kind, _ in events)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_stream_parser_continuing_an_opened_think_block(chunk):
    text = "carry the one\n</think>\n\n132"
    parser = ReplyStreamParser(in_thinking=True)
    events = [event for i in range(0, len(text), chunk) for event in parser.feed(text[i:i + chunk])]
    reply, rest = parser.finish()
    assert "".join(t for kind, t in events if kind == "reasoning") == "carry the one"
    assert "".join(t for kind, t in events if kind == "content") + rest == "132"
    assert (reply.reasoning_content, reply.content) == ("carry the one", "132")


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_stream_parser_gives_back_a_refused_call_as_content(chunk):
    text = 'Hm.\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    parser = ReplyStreamParser(TOOLS)
    events = [event for i in range(0, len(text), chunk) for event in parser.feed(text[i:i + chunk])]
    reply, rest = parser.finish()
    assert "".join(t for kind, t in events if kind == "content") + rest == text
    assert reply.problems and not reply.tool_calls


# --- an older tokenizer and model gain the chat tokens ---

def older_tokenizer(texts):
    """A tokenizer as acornlm trained them before the chat tokens existed."""
    from tokenizers import Tokenizer as Backend

    from acornlm.tokenizer import Tokenizer
    data = json.loads(train_tokenizer(texts, kind="bpe", vocab_size=300).backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in CHAT_TOKENS]
    return Tokenizer(Backend.from_str(json.dumps(data)), "bpe")


@pytest.mark.parametrize("tied", [True, False])
def test_add_chat_tokens_grows_the_model_and_keeps_its_logits(tmp_path, tied):
    import torch

    from acornlm.cli import main
    from acornlm.model import ModelConfig, Transformer
    from acornlm.model.checkpoint import load_model, write_model_files
    from acornlm.tokenizer import load_tokenizer

    texts = [chat_text(TOOL_CHAT, tools=TOOLS), "the quick brown fox " * 30] * 5
    old = older_tokenizer(texts)
    old.save(tmp_path / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=old.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                                    tie_word_embeddings=tied))
    (tmp_path / "old").mkdir()
    write_model_files(tmp_path / "old", model, info={"stage": "sft", "tokenizer": {"fingerprint": old.fingerprint}},
                      tokenizer_dir=tmp_path / "tok")
    with pytest.raises(ConfigError, match="add-chat-tokens"):
        render_chat(load_tokenizer(tmp_path / "old"), TOOL_CHAT, tools=TOOLS)

    main(["tokenizer", "add-chat-tokens", "--ckpt", str(tmp_path / "old"), "--out", str(tmp_path / "new")])
    new_tok = load_tokenizer(tmp_path / "new")
    assert new_tok.vocab_size == old.vocab_size + len(CHAT_TOKENS)
    assert [new_tok.token_to_id(t) for t in CHAT_TOKENS] == list(range(old.vocab_size, new_tok.vocab_size))
    ids = old.encode("the quick brown fox")
    assert new_tok.encode("the quick brown fox") == ids  # no id moved
    grown, info = load_model(tmp_path / "new")
    assert grown.config.vocab_size == new_tok.vocab_size
    assert info["tokenizer"]["fingerprint"] == new_tok.fingerprint
    x = torch.tensor([ids])
    with torch.no_grad():
        before, after = model.eval()(x), grown(x)
    assert torch.equal(after[..., :old.vocab_size], before)
    mean_row = model.model.embed_tokens.weight.mean(0)
    assert torch.allclose(grown.model.embed_tokens.weight[-1], mean_row)
    assert render_chat(new_tok, TOOL_CHAT, tools=TOOLS).num_targets > 0
    from acornlm.cli.tokenizer import add_chat_tokens
    with pytest.raises(ConfigError, match="not empty"):
        add_chat_tokens(str(tmp_path / "old"), str(tmp_path / "new"))
    with pytest.raises(ConfigError, match="already has every chat token"):
        add_chat_tokens(str(tmp_path / "new"), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
