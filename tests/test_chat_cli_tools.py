"""`acornlm chat` with /think and --tools, on a scripted language model (a tiny random model never
writes a tool call): the replies are fixed texts streamed token by token through the real streaming
detokenizer; everything else (rendering, parsing, running the tools, the loop) is the real chat."""

from __future__ import annotations

import collections
import io
import json
from types import SimpleNamespace

import pytest

from acornlm.cli.chat import ChatTools, chat, fit_history, run_chat
from acornlm.data.chat import chat_text
from acornlm.errors import ConfigError
from acornlm.infer.streaming import StreamingDetokenizer
from acornlm.infer.tools import load_tool_functions
from acornlm.tokenizer import Tokenizer, train_tokenizer
from acornlm.tokenizer.special_tokens import CHAT_TOKENS

TOOLS_FILE = '''
import time


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def fail(reason: str) -> str:
    """Always fails."""
    raise ValueError(reason)


def wait(seconds: float) -> str:
    """Sleeps."""
    time.sleep(seconds)
    return "awake"
'''


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


class ScriptedLM:
    """What run_chat uses of a LanguageModel; `stream` says the queued replies, token by token."""

    def __init__(self, tokenizer: Tokenizer, *replies: str) -> None:
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.replies = collections.deque(replies)
        self.prompts: list[str] = []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def stream(self, prompt: str, **params):
        self.prompts.append(prompt)
        detok = StreamingDetokenizer(self.tokenizer.token_bytes)
        for token in self.tokenizer.encode(self.replies.popleft() if self.replies else "ok"):
            piece = detok.push(token)
            if piece:
                yield piece
        tail = detok.flush()
        if tail:
            yield tail


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["<think>\nI should add.\n</think>\n\n" + call("add", a=2, b=3), "The sum is 5. 你好 🎉"]
    return train_tokenizer(texts * 5, "bpe", 320)


@pytest.fixture
def functions(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_FILE, encoding="utf-8")
    return load_tool_functions(path)


def talk(lm, lines: list[str], **options) -> str:
    out = io.StringIO()
    run_chat(lm, {"max_new_tokens": 50}, None, io.StringIO("\n".join(lines) + "\n"), out, **options)
    return out.getvalue()


def test_think_on_and_off(tokenizer):
    lm = ScriptedLM(tokenizer, "\nI should add.\n</think>\n\nThe sum is 5.", "5 again")
    out = talk(lm, ["/think on", "2 + 3?", "/think off", "again?", "/think maybe", "/show"])
    assert lm.prompts[0].endswith("<|im_start|>assistant\n<think>\n")
    assert "assistant> (thinking) I should add.\nThe sum is 5.\n" in out  # not a terminal: prefixed, not dimmed
    assert lm.prompts[1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the first reply's thinking stays in the conversation, as the chat template keeps it
    assert "<|im_start|>assistant\n<think>\nI should add.\n</think>\n\nThe sum is 5.<|im_end|>" in lm.prompts[1]
    assert "error: /think takes on, off or default" in out and "think: off" in out
    # with thinking off the reply is kept with the empty think block the prompt gave it
    lm.replies.append("fine")
    talk(lm, ["/think off", "one", "two"])
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nfine<|im_end|>" in lm.prompts[-1]


def test_thinking_is_dimmed_on_a_terminal(tokenizer):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    lm = ScriptedLM(tokenizer, "<think>\nhm \x1b[2J\n</think>\n\nok")
    out = Terminal()
    run_chat(lm, {"max_new_tokens": 50}, None, io.StringIO("hi\n"), out)
    assert "assistant> \x1b[2m(thinking) hm \\x1b[2J\x1b[0m\nok\n" in out.getvalue()  # the model's escape is shown


def test_tools_are_offered_called_and_their_results_sent_back(tokenizer, functions):
    lm = ScriptedLM(tokenizer, "<think>\nI should add.\n</think>\n\n" + call("add", a=2, b=3), "The sum is 5.")
    out = talk(lm, ["what is 2 + 3?"], tools=ChatTools(functions, timeout_s=5))
    assert out.startswith("tools: add, fail, wait\n")
    assert '"name": "add", "description": "Add two integers."' in lm.prompts[0]  # the schema is in the prompt
    assert 'tool> add({"a": 2, "b": 3})\ntool result> 5\nassistant> The sum is 5.\n' in out
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n" \
        in lm.prompts[1]


def test_a_raising_or_hanging_tool_gives_its_error_and_the_chat_goes_on(tokenizer, functions):
    lm = ScriptedLM(tokenizer, call("fail", reason="no luck"), "Sorry.", call("wait", seconds=5), "Too slow.",
                    "next answer")
    out = talk(lm, ["try", "sleep", "anything else?"], tools=ChatTools(functions, timeout_s=0.2))
    assert "tool result> error: fail raised ValueError: no luck\n" in out
    assert "<tool_response>\nerror: fail raised ValueError: no luck\n</tool_response>" in lm.prompts[1]
    assert "tool result> error: wait did not return within 0.2 s\nassistant> Too slow.\n" in out
    assert "assistant> next answer" in out


def test_a_malformed_call_is_text_and_rounds_are_limited(tokenizer, functions):
    broken = call("add", a="two", b=3)
    lm = ScriptedLM(tokenizer, broken, *[call("add", a=1, b=1)] * 3)
    out = talk(lm, ["add badly", "loop"], tools=ChatTools(functions, timeout_s=5, max_rounds=2))
    assert f"assistant> {broken}\n(tool call not run: add: arguments.a must be integer" in out
    assert out.count("tool> add") == 2  # two rounds of calls, then the model must answer
    assert "# Tools" not in lm.prompts[-1]  # the last round offers no tools
    assert len(lm.prompts) == 4


def test_thinking_and_tools_need_the_chat_tokens(tokenizer):
    from tokenizers import Tokenizer as Backend

    data = json.loads(tokenizer.backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in CHAT_TOKENS]
    older = Tokenizer(Backend.from_str(json.dumps(data)), "bpe")
    lm = ScriptedLM(older, "<think>\nraw\n</think>\n\ntext")
    out = talk(lm, ["/think on", "hi"])
    assert "error: /think needs the chat tokens" in out and "add-chat-tokens" in out
    assert "assistant> <think>\nraw\n</think>\n\ntext\n" in out  # printed as it comes


def test_chat_checks_tool_options_before_loading_the_model(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        chat(ckpt=str(tmp_path / "nowhere"), tools=str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="tool_timeout"):
        chat(ckpt=str(tmp_path / "nowhere"), tool_timeout=0)
    with pytest.raises(ConfigError, match="max_tool_rounds"):
        chat(ckpt=str(tmp_path / "nowhere"), max_tool_rounds=0)


def test_fit_history_drops_whole_exchanges_with_their_tool_rounds():
    history = [{"role": "user", "content": "a " * 50},
               {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1}}]},
               {"role": "tool", "content": "1"},
               {"role": "assistant", "content": "one"},
               {"role": "user", "content": "b"}]
    kept = fit_history(history, "sys", len, budget=len(chat_text(
        [{"role": "system", "content": "sys"}, history[-1]], add_generation_prompt=True)))
    assert kept == [{"role": "system", "content": "sys"}, {"role": "user", "content": "b"}]
    assert fit_history(history, None, len, budget=10**6) == history
