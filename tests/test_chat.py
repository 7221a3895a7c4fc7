"""Chat rendering (ids + assistant-only loss mask) and the chat dataset formats."""

from __future__ import annotations

import json

import pytest

from acornlm.data.chat import IM_END_ID, IM_START_ID, chat_text, message_problem, render_chat, render_prompt
from acornlm.data.conversations import load_conversations
from acornlm.errors import DataError
from acornlm.tokenizer import train_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am acornlm."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
]
TRICKY = [  # unicode, a reply starting with newlines, leading spaces
    {"role": "user", "content": "Était-ce\tça ? 你好"},
    {"role": "assistant", "content": "\n\n  Oui, c'est ça. 🙂"},
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    texts = [chat_text(CONVERSATION), chat_text(TRICKY), "the quick brown fox jumps over the lazy dog " * 5]
    tokenizer = train_tokenizer(texts * 10, kind="bpe", vocab_size=300)
    directory = tmp_path_factory.mktemp("bpe")
    tokenizer.save(directory)
    return tokenizer, directory


@pytest.fixture(scope="module")
def char_tokenizer():
    return train_tokenizer([chat_text(CONVERSATION)], kind="char", vocab_size=64)


def test_loss_mask_matches_a_hand_built_example(char_tokenizer):
    """With one token per character the expected ids and mask can be written out by hand."""
    tok = char_tokenizer

    def chars(text: str) -> list[int]:
        return [tok.token_to_id(c) for c in text]

    ids, mask = [], []

    def add(part: list[int], trained: bool) -> None:
        ids.extend(part)
        mask.extend([int(trained)] * len(part))

    add([IM_START_ID] + chars("system\nBe brief.") + [IM_END_ID] + chars("\n"), False)
    add([IM_START_ID] + chars("user\nWho are you?") + [IM_END_ID] + chars("\n"), False)
    add([IM_START_ID] + chars("assistant\n"), False)
    add(chars("I am acornlm.") + [IM_END_ID], True)
    add(chars("\n"), False)
    add([IM_START_ID] + chars("user\nWhat is 2 + 2?") + [IM_END_ID] + chars("\n"), False)
    add([IM_START_ID] + chars("assistant\n"), False)
    add(chars("4") + [IM_END_ID], True)
    add(chars("\n"), False)

    rendered = render_chat(tok, CONVERSATION)
    assert rendered.ids == ids
    assert rendered.loss_mask == mask
    assert rendered.num_targets == len("I am acornlm.") + 1 + len("4") + 1


def test_rendering_equals_transformers_apply_chat_template(bpe):
    transformers = pytest.importorskip("transformers")
    tokenizer, directory = bpe
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    for messages in (CONVERSATION, TRICKY, CONVERSATION[1:3]):
        for generation_prompt in (False, True):
            expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            if isinstance(expected, dict) or hasattr(expected, "keys"):
                expected = expected["input_ids"]
            assert render_chat(tokenizer, messages, generation_prompt).ids == list(expected)
    prompt = hf.apply_chat_template(CONVERSATION[:2], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert render_prompt(tokenizer, CONVERSATION[:2]) == list(prompt)


def test_bpe_mask_covers_exactly_the_assistant_replies(bpe):
    tokenizer, _ = bpe
    rendered = render_chat(tokenizer, CONVERSATION)
    trained = [t for t, m in zip(rendered.ids, rendered.loss_mask) if m]
    assert tokenizer.decode(trained) == "I am acornlm.<|im_end|>4<|im_end|>"
    untrained = [t for t, m in zip(rendered.ids, rendered.loss_mask) if not m]
    assert "acornlm" not in tokenizer.decode(untrained)
    assert IM_END_ID in untrained  # the system/user turns' <|im_end|> are not trained on
    # every <|im_end|> closing an assistant turn is a target, and nothing after the last one is
    ends = [i for i, t in enumerate(rendered.ids) if t == IM_END_ID]
    assert [rendered.loss_mask[i] for i in ends] == [0, 0, 1, 0, 1]
    assert not any(rendered.loss_mask[ends[-1] + 1:])


def test_a_token_straddling_the_header_belongs_to_the_reply(bpe):
    """A reply starting with newlines may merge with the header's newline into one BPE token;
    it is trained on, so every character of the reply is learned."""
    tokenizer, _ = bpe
    rendered = render_chat(tokenizer, TRICKY)
    trained_text = tokenizer.decode([t for t, m in zip(rendered.ids, rendered.loss_mask) if m])
    assert trained_text.endswith("\n\n  Oui, c'est ça. 🙂<|im_end|>")
    assert len(trained_text) <= len("\n\n\n  Oui, c'est ça. 🙂<|im_end|>")


def test_message_problems_are_named():
    assert message_problem(CONVERSATION) is None
    assert message_problem([{"role": "user", "content": "hi"}]).startswith("no assistant turn")
    assert message_problem([{"role": "assistant", "content": "hi"}]).startswith("roles out of order")
    assert message_problem([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                            {"role": "assistant", "content": "c"}]).startswith("roles out of order")
    assert message_problem([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                            {"role": "assistant", "content": "c"}]).startswith("roles out of order")
    assert message_problem([{"role": "function", "content": "a"}]).startswith("unsupported role")
    assert message_problem([{"role": "tool", "content": "a"}]).startswith("roles out of order")
    assert "special token" in message_problem([{"role": "user", "content": "a<|im_end|>"},
                                               {"role": "assistant", "content": "b"}])
    assert message_problem([{"role": "user", "content": 3}]).startswith("malformed")
    with pytest.raises(DataError, match="roles out of order"):
        render_chat(train_tokenizer(["ab"], kind="char", vocab_size=16), [{"role": "assistant", "content": "a"}])


# --- dataset formats ---

EXPECTED = [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Add 2 and 3\n2 3"},
    {"role": "assistant", "content": "5"},
]
RECORDS = {
    "messages": {"messages": EXPECTED},
    "minimind": {"conversations": EXPECTED},
    "sharegpt": {"conversations": [
        {"from": "system", "value": "You are kind."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Add 2 and 3\n2 3"},
        {"from": "gpt", "value": "5"}]},
    "alpaca": {"system": "You are kind.", "history": [["Hi", "Hello!"]], "instruction": "Add 2 and 3",
               "input": "2 3", "output": "5"},
}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", list(RECORDS))
def test_every_format_parses_to_the_same_conversation(tmp_path, name):
    record = RECORDS[name]
    path = write_jsonl(tmp_path / f"{name}.jsonl", [record, record])
    for data_format in ("auto", name):
        conversations, stats = load_conversations([path], data_format)
        assert [c.messages for c in conversations] == [EXPECTED, EXPECTED]
        assert conversations[1].source == f"{path}:2"
        assert stats.kept == 2 and stats.skipped == 0
    assert stats.formats == {path: name}
    as_list = tmp_path / f"{name}.json"
    as_list.write_text(json.dumps([record]), encoding="utf-8")
    conversations, _ = load_conversations(as_list)
    assert conversations[0].messages == EXPECTED and conversations[0].source == f"{as_list}[0]"


def test_openai_content_parts_are_joined(tmp_path):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                        {"type": "text", "text": "there"}]},
                           {"role": "assistant", "content": "Hello"}]}
    conversations, _ = load_conversations(write_jsonl(tmp_path / "parts.jsonl", [record]))
    assert conversations[0].messages[0]["content"] == "Hi there"


def test_skipped_conversations_are_counted_with_their_line(tmp_path):
    good = RECORDS["messages"]
    no_assistant = {"messages": [{"role": "user", "content": "Hi"}]}
    out_of_order = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
    unsupported = {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, no_assistant, out_of_order, good, unsupported])
    conversations, stats = load_conversations(path)
    assert [c.source for c in conversations] == [f"{path}:1", f"{path}:4"]
    assert (stats.records, stats.kept, stats.no_assistant, stats.bad_roles) == (5, 2, 1, 2)
    assert stats.problems[0].startswith(f"{path}:2: no assistant turn")
    assert stats.problems[1].startswith(f"{path}:3: roles out of order")
    assert "2 of 5 conversations kept" in stats.summary()

    only_bad = write_jsonl(tmp_path / "bad.jsonl", [no_assistant, out_of_order])
    with pytest.raises(DataError, match=r"no trainable conversation.*bad.jsonl:1: no assistant turn"):
        load_conversations(only_bad)


def test_malformed_files_name_the_file_and_line(tmp_path):
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError) as error:
        load_conversations(unknown)
    message = str(error.value)
    assert f"{unknown}:1" in message and "'prompt', 'completion'" in message
    assert all(name in message for name in RECORDS)  # lists the supported formats

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(RECORDS["messages"]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_conversations(broken)

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [RECORDS["messages"], RECORDS["alpaca"]])
    with pytest.raises(DataError, match=r"mixed.jsonl:2: expected the messages format"):
        load_conversations(mixed)

    no_role = write_jsonl(tmp_path / "norole.jsonl", [{"messages": [{"content": "hi"}]}])
    with pytest.raises(DataError, match=r"norole.jsonl:1: message #0"):
        load_conversations(no_role)

    with pytest.raises(DataError, match="unknown chat data format"):
        load_conversations(no_role, "chatml")
    with pytest.raises(DataError, match="does not exist"):
        load_conversations(tmp_path / "missing.jsonl")


def test_a_folder_reads_its_files_in_order(tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [RECORDS["alpaca"]])
    write_jsonl(folder / "a.jsonl", [RECORDS["sharegpt"]])
    conversations, stats = load_conversations(folder)
    assert [c.source for c in conversations] == [f"{folder / 'a.jsonl'}:1", f"{folder / 'b.jsonl'}:1"]
    assert set(stats.formats.values()) == {"sharegpt", "alpaca"}
