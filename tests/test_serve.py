"""The OpenAI-compatible server, driven by the real `openai` client (and httpx for raw HTTP)."""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from acornlm.cli.terminal import visible
from acornlm.data.chat import render_prompt
from acornlm.errors import ConfigError
from acornlm.infer.engine import Engine, EngineStopped
from acornlm.infer.generate import generate_tokens
from acornlm.infer.sampling import SamplingParams
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import write_model_files
from acornlm.serve.app import create_app
from acornlm.serve.engine_process import EngineProcess, EngineSettings
from acornlm.serve.protocol import ServerLimits
from acornlm.serve.server import BackgroundServer, load_engine
from acornlm.tokenizer import train_tokenizer

API_KEY = "test-key-123"
MODEL = "tiny"
HELLO = [{"role": "user", "content": "the king speaks"}]
CORPUS = ["The king speaks to the queen near the river.", "A song at night, bread in the morning.",
          "Friends and enemies walk over the green stone bridge.", "你好，世界 🎉"] * 5


pytestmark = pytest.mark.usefixtures("one_thread")


def write_checkpoint(root, context: int):
    """A random tiny model with a BPE tokenizer, written as a checkpoint directory."""
    tokenizer = train_tokenizer(CORPUS, "bpe", 300)
    tokenizer.save(root / "tokenizer")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context, initializer_range=0.3)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    write_model_files(ckpt, Transformer(config), {"step": 0}, tokenizer_dir=root / "tokenizer")
    return ckpt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve"), context=256)


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """The same tiny model with room for thousands of tokens: a stream that must still be running
    when the test acts on it (~1 s at the tiny model's speed), however fast the machine."""
    return write_checkpoint(tmp_path_factory.mktemp("serve-long"), context=4096)


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = load_engine(checkpoint, device="cpu", max_batch=4, max_queue=32).start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    limits = ServerLimits(max_output_tokens=300, max_body_bytes=20_000, max_n=4)
    with BackgroundServer(create_app(engine, MODEL, api_key=API_KEY, limits=limits)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def reference(engine, prompt_ids, eos_ids=(0, 2), **settings) -> tuple[str, list[int]]:
    """What a request should produce: the same model and settings, unbatched, without HTTP.

    The text is the tokens' bytes (special tokens make no text) decoded as a stream decoder does.
    """
    tokens = list(generate_tokens(engine.model, prompt_ids, SamplingParams(**settings), eos_ids=eos_ids,
                                  vocab_size=engine.vocab_size))
    raw = b"".join(engine.tokenizer.token_bytes(t) for t in tokens if t not in engine.special_token_ids)
    return raw.decode("utf-8", errors="replace"), tokens


# --------------------------------------------------------------------------- happy paths


def test_models_list_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health").json()  # no API key needed
    assert health["status"] == "ok" and health["model"] == MODEL and health["max_batch"] == 4


def test_chat_completion_matches_direct_generation(client, engine):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    prompt_ids = render_prompt(engine.tokenizer, HELLO)
    text, tokens = reference(engine, prompt_ids, max_new_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("length" if len(tokens) == 12 else "stop")
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_with_ignore_eos_uses_all_max_tokens(client, engine):
    reply = client.completions.create(model=MODEL, prompt="the king", max_tokens=9, temperature=0.7, seed=3,
                                      extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 9
    prompt_ids = engine.tokenizer.encode("the king")
    assert choice.text == reference(engine, prompt_ids, eos_ids=(), max_new_tokens=9, temperature=0.7, seed=3)[0]
    assert reply.object == "text_completion" and reply.usage.prompt_tokens == len(prompt_ids)


def test_streaming_with_usage_equals_the_non_streamed_reply(client):
    settings = dict(model=MODEL, messages=HELLO, max_tokens=20, temperature=1.0, seed=7, top_p=0.9,
                    extra_body={"top_k": 40, "min_p": 0.01, "ignore_eos": True})
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # the seed reproduces; streaming loses nothing
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "prompt": "the", "max_tokens": 4, "stream": True, "seed": 1}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_string_cuts_the_reply(client):
    settings = dict(model=MODEL, messages=HELLO, max_tokens=40, temperature=1.0, seed=11,
                    extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**settings).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip()
    cut = client.chat.completions.create(**settings, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**settings, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.index(stop)]


def test_n_choices_differ_and_each_seed_reproduces(client):
    settings = dict(model=MODEL, messages=HELLO, max_tokens=15, temperature=1.0, seed=21, n=3,
                    extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**settings)
    again = client.chat.completions.create(**settings)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) == 3
    assert first.usage.completion_tokens == 45
    streamed = client.chat.completions.create(**settings, stream=True)
    parts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            parts[choice.index] += choice.delta.content or ""
    assert parts == texts


def test_logprobs(client, engine):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        alternatives = [a.logprob for a in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert entry.logprob == pytest.approx(alternatives[0])  # greedy: the chosen token is the most likely
        assert entry.logprob <= 0
    raw = b"".join(bytes(entry.bytes) for entry in content)
    assert raw.decode("utf-8", errors="replace") == reply.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="the", max_tokens=5, logprobs=2, temperature=0,
                                           extra_body={"ignore_eos": True})
    legacy = completion.choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 5
    assert legacy.text_offset[0] == 0


# --------------------------------------------------------------------------- errors


def test_error_paths_raise_the_matching_client_exceptions(client, server):
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert excinfo.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "king " * 400}])
    assert excinfo.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.chat.completions.create(model=MODEL, messages=HELLO, seed=2**70)
    with pytest.raises(openai.BadRequestError, match="special token"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi<|im_end|>"}])
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"n": "many"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=HELLO)


def test_raw_http_errors_have_the_openai_shape(server):
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    cases = [
        (httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=auth),
         400, "not valid JSON"),
        (httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO}), 401,
         "missing API key"),
        (httpx.post(server.url + "/v1/completions", headers=auth,
                    content=json.dumps({"model": MODEL, "prompt": "x" * 30_000})), 413, "limit"),
        (httpx.get(server.url + "/v1/nowhere", headers=auth), 404, "Not Found"),
        (httpx.post(server.url + "/v1/completions", headers=auth, json={"model": MODEL, "prompt": [99999]}), 400,
         "token ids"),
    ]
    for response, status, text in cases:
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and text in error["message"]
        assert "Traceback" not in response.text


def test_full_queue_answers_429_and_a_stopped_engine_503(checkpoint):
    engine = load_engine(checkpoint, device="cpu", max_batch=1, max_queue=0).start()
    app = create_app(engine, MODEL)
    try:
        with BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            stream = client.completions.create(model=MODEL, prompt="the", max_tokens=250, stream=True,
                                               extra_body={"ignore_eos": True})
            next(iter(stream))  # the only slot is busy now
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=MODEL, prompt="the", max_tokens=5)
            stream.close()
            engine.shutdown()
            with pytest.raises(openai.InternalServerError) as excinfo:
                client.completions.create(model=MODEL, prompt="the", max_tokens=5)
            assert excinfo.value.status_code == 503
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------- concurrency


def test_sixteen_concurrent_streams_complete_correctly(client, engine):
    """16 streams through a 4-slot engine: all finish, each equals its unbatched generation."""
    prompt_ids = render_prompt(engine.tokenizer, HELLO)
    results: dict[int, str] = {}
    errors: list[Exception] = []
    steps_before = engine.decode_steps

    def worker(seed: int) -> None:
        try:
            stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, temperature=1.0,
                                                    seed=seed, stream=True, extra_body={"ignore_eos": True})
            results[seed] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed in range(16):
        assert results[seed] == reference(engine, prompt_ids, eos_ids=(), max_new_tokens=24, temperature=1.0,
                                          seed=seed)[0]
    assert engine.decode_steps - steps_before < 16 * 23  # rows were decoded together


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_disconnected_stream_frees_its_slot(server, engine):
    aborted_before = engine.finished["abort"]
    body = {"model": MODEL, "prompt": "the king", "max_tokens": 250, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # generation has started
            assert engine.num_running == 1
    # the connection is closed: the server cancels the sequence and the batch shrinks
    assert wait_until(lambda: engine.num_running == 0)
    assert engine.finished["abort"] == aborted_before + 1


# --------------------------------------------------------------------------- page, CLI


def test_chat_page_and_static_files_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/static/chat.js" in page.text
    script = httpx.get(server.url + "/static/chat.js")
    assert script.status_code == 200
    assert not re.search(r"(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write", script.text)


def test_serve_cli_checks_its_options(checkpoint):
    from acornlm.cli.serve import serve

    with pytest.raises(ConfigError, match="--ckpt"):
        serve()
    with pytest.raises(ConfigError, match="max_tokens"):
        serve(ckpt=str(checkpoint), max_tokens=0)
    with pytest.raises(ConfigError, match="max_batch"):
        serve(ckpt=str(checkpoint), max_batch=0)


@pytest.mark.parametrize("engine_process", [True, False])
def test_serve_command_end_to_end(checkpoint, engine_process):
    """The serve command in its own process: API key from the environment, one chat, shut down;
    with the engine in a process of its own (the default) and on a thread."""
    env = {**os.environ, "ACORNLM_API_KEY": " from-env\n"}  # surrounding whitespace is stripped
    process, url = start_serve_command(checkpoint, env=env, max_batch=2, engine_process=engine_process)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0)
        reply = client.chat.completions.create(model=checkpoint.name, messages=HELLO, max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="other", max_retries=0).models.list()
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert f"chat page {url}/" in output and "API key required" in output


def test_engine_fixture_is_thread_safe_with_direct_streams(engine):
    """The engine serves in-process callers next to HTTP ones (as the benchmark and notebooks do)."""
    events = list(engine.stream([5, 6, 7], SamplingParams(max_new_tokens=5, temperature=0)))
    assert events[-1].finished and events[-1].completion_tokens <= 5
    assert isinstance(engine, Engine)


def test_chat_cli_multi_turn_with_commands(checkpoint, monkeypatch, capsys):
    from acornlm.cli.chat import chat
    from acornlm.data.chat import chat_text
    from acornlm.infer.api import LanguageModel

    typed = ["the king", "/set max_tokens 4", "/set bogus 1", "/set temperature -1", "/set system Be brief.",
             "the queen", "/show", "/reset", "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(typed) + "\n"))
    chat(ckpt=str(checkpoint), temperature=0, max_new_tokens=6, device="cpu")
    out = capsys.readouterr().out

    lm = LanguageModel.from_checkpoint(checkpoint, device="cpu")
    greedy = dict(temperature=0, stop_token_ids=[2, 0])
    first = lm.generate(chat_text([{"role": "user", "content": "the king"}], True), max_new_tokens=6, **greedy)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the king"},
               {"role": "assistant", "content": first.replace("<|im_start|>", "")},
               {"role": "user", "content": "the queen"}]
    second = lm.generate(chat_text(history, True), max_new_tokens=4, **greedy)
    assert f"assistant> {visible(first)}\n" in out and f"assistant> {visible(second)}\n" in out  # saw the first
    assert "error: unknown setting 'bogus'" in out and "error: temperature must be a number in [0, 2]" in out
    assert "max_new_tokens: 4" in out and "(conversation cleared)" in out
    assert out.count("assistant> ") == 2 and "never read" not in out


def test_a_client_that_gives_up_on_a_non_streaming_request_frees_its_slot(server, engine, monkeypatch):
    decode = engine._decode

    def slow_decode() -> None:  # 250 tokens take >= 2.5 s: the client gives up long before
        time.sleep(0.01)
        decode()

    monkeypatch.setattr(engine, "_decode", slow_decode)
    aborted_before = engine.finished["abort"]
    body = {"model": MODEL, "prompt": "the king", "max_tokens": 250, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):  # the client stops waiting for the whole reply and hangs up
        with httpx.Client(timeout=httpx.Timeout(30, read=0.3)) as http:
            http.post(server.url + "/v1/completions", json=body, headers=headers)
    assert wait_until(lambda: engine.num_running == 0)
    assert engine.finished["abort"] == aborted_before + 1


# --------------------------------------------------------------------------- the engine in its own process


LONG = 3000  # tokens of a stream that must outlast the test's action on it


@pytest.fixture(scope="module")
def process_engine(long_checkpoint):
    engine = EngineProcess(EngineSettings(str(long_checkpoint), device="cpu", max_batch=2, max_queue=2,
                                          threads=1)).start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def process_server(process_engine):
    with BackgroundServer(create_app(process_engine, MODEL, limits=ServerLimits(max_output_tokens=LONG))) as server:
        yield server


def test_engine_process_serves_what_the_engine_generates(process_engine, process_server, long_checkpoint):
    """4 streams through a 2-slot engine in its own process: each equals its unbatched generation."""
    engine = load_engine(long_checkpoint, device="cpu")  # in this process, for the reference
    assert (process_engine.num_params, process_engine.context_length, process_engine.vocab_size) == (
        engine.num_params, engine.context_length, engine.vocab_size)
    client = openai.OpenAI(base_url=process_server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    prompt_ids = render_prompt(engine.tokenizer, HELLO)
    results: dict[int, str] = {}
    steps_before = process_engine.decode_steps

    def worker(seed: int) -> None:
        stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=1.0,
                                                seed=seed, stream=True, extra_body={"ignore_eos": True})
        results[seed] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in range(4):
        assert results[seed] == reference(engine, prompt_ids, eos_ids=(), max_new_tokens=20, temperature=1.0,
                                          seed=seed)[0]
    assert 20 <= process_engine.decode_steps - steps_before < 4 * 19  # rows were decoded together
    health = httpx.get(process_server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["finished"]["length"] >= 4


def test_engine_process_checks_requests_before_sending_them(process_engine, process_server):
    client = openai.OpenAI(base_url=process_server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="seed must be"):
        client.completions.create(model=MODEL, prompt="the", max_tokens=2, seed=2**70)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="the king " * 3000, max_tokens=2)
    with pytest.raises(ConfigError, match="one sample"):
        process_engine.submit([1, 2], SamplingParams(num_samples=2), on_event=lambda event: None)
    # 2 running + 2 waiting fill the engine: the fifth sequence is refused at once (HTTP 429)
    events: list = []
    handles = [process_engine.submit([1, 2, 3], SamplingParams(max_new_tokens=LONG), ignore_eos=True,
                                     on_event=events.append) for _ in range(4)]
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="the", max_tokens=2)
    for handle in handles:
        handle.cancel()
    assert wait_until(lambda: sum(e.finished for e in events) == 4)
    assert [e.finish_reason for e in events if e.finished] == ["abort"] * 4
    assert wait_until(lambda: process_engine.num_running == 0 and process_engine.num_waiting == 0)


def test_engine_process_disconnected_stream_frees_its_slot(process_engine, process_server):
    aborted_before = process_engine.finished["abort"]
    body = {"model": MODEL, "prompt": "the king", "max_tokens": LONG, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", process_server.url + "/v1/completions", json=body) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
            assert wait_until(lambda: process_engine.num_running == 1)
    assert wait_until(lambda: process_engine.num_running == 0)
    assert process_engine.finished["abort"] == aborted_before + 1


def test_engine_process_death_ends_streams_with_an_error_and_health_503(long_checkpoint):
    engine = EngineProcess(EngineSettings(str(long_checkpoint), device="cpu", max_batch=1, threads=1)).start()
    try:
        with BackgroundServer(create_app(engine, MODEL, limits=ServerLimits(max_output_tokens=LONG))) as server:
            body = {"model": MODEL, "prompt": "the", "max_tokens": LONG, "stream": True, "ignore_eos": True}
            with httpx.Client(timeout=30) as http:
                with http.stream("POST", server.url + "/v1/completions", json=body) as response:
                    lines = response.iter_lines()
                    next(line for line in lines if line.startswith("data: "))
                    engine._process.kill()
                    rest = list(lines)
            assert any('"code": "error"' in line and "engine process exited" in line for line in rest)
            assert not engine.alive
            health = httpx.get(server.url + "/health")
            assert health.status_code == 503
            assert health.json()["running"] == 0 and health.json()["waiting"] == 0  # not the dead engine's load
            reply = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "the"})
            assert reply.status_code == 503 and "Traceback" not in reply.text
    finally:
        engine.shutdown()


def test_engine_process_shutdown_aborts_running_sequences_and_bad_checkpoints_fail_early(long_checkpoint,
                                                                                           tmp_path):
    engine = EngineProcess(EngineSettings(str(long_checkpoint), device="cpu", max_batch=1, threads=1)).start()
    events: list = []
    engine.submit([1, 2, 3], SamplingParams(max_new_tokens=LONG), ignore_eos=True, on_event=events.append)
    assert wait_until(lambda: len(events) > 0)
    engine.shutdown()
    assert events[-1].finish_reason == "abort" and sum(e.finished for e in events) == 1
    assert not engine.alive
    with pytest.raises(EngineStopped):
        engine.submit([1, 2], SamplingParams(), on_event=events.append)
    with pytest.raises(ConfigError, match="no-such-checkpoint"):
        EngineProcess(EngineSettings(str(tmp_path / "no-such-checkpoint"), device="cpu"))


# --------------------------------------------------------------------------- hardening (issue 16)


def test_sampling_settings_out_of_range_get_400_and_a_tiny_temperature_is_greedy(client):
    """The values that once made the sampler produce nan/inf are refused at the API, naming the field."""
    for settings, param in ((dict(frequency_penalty=1e39), "frequency_penalty"),
                            (dict(presence_penalty=-3), "presence_penalty"),
                            (dict(temperature=2.5), "temperature"),
                            (dict(extra_body={"repetition_penalty": 1e-300}), "repetition_penalty"),
                            (dict(extra_body={"repetition_penalty": 1e9}), "repetition_penalty")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, **settings)
        assert caught.value.body["param"] == param and "[" in caught.value.body["message"]
    tiny = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=1e-50)
    greedy = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_engine_process_guard_ends_only_the_overflowing_sequences_and_capacity_is_whole(process_engine):
    """Values that bypass the API's checks (sent straight to the engine process) end their own
    sequence with an error; the streams beside them finish, and no callback is left behind."""
    events: dict[int, list] = {i: [] for i in range(4)}
    normal = SamplingParams(max_new_tokens=40, temperature=0.0)
    poisoned = SamplingParams(max_new_tokens=40, temperature=1.0, seed=0)
    poisoned.frequency_penalty = 1e39  # set after validation, as a bug or a future caller might
    process_engine.submit([1, 2, 3], normal, ignore_eos=True, on_event=events[0].append)
    process_engine.submit([4, 5], poisoned, ignore_eos=True, on_event=events[1].append)
    process_engine.submit([6, 7, 8], normal, ignore_eos=True, on_event=events[2].append)
    bad_prefill = SamplingParams(max_new_tokens=40, temperature=0.0)
    bad_prefill.repetition_penalty = 1e-300  # overflows on the first token, during admission
    process_engine.submit([1, 2, 3, 4], bad_prefill, ignore_eos=True, on_event=events[3].append)
    assert wait_until(lambda: all(e and e[-1].finished for e in events.values()))
    assert [events[i][-1].finish_reason for i in range(4)] == ["length", "error", "length", "error"]
    assert "nan/inf" in events[1][-1].error and "nan/inf" in events[3][-1].error
    assert sum(e.token_id is not None for e in events[0]) == 40
    assert wait_until(lambda: not process_engine._callbacks and process_engine.num_running == 0)


def test_engine_process_answers_a_cancel_for_a_sequence_it_does_not_know(process_engine):
    """A cancel that finds no sequence (finished, or lost) still gets a final event back, so the
    server's callback of that id is released and cannot count against the queue for ever."""
    events: list = []
    with process_engine._lock:
        process_engine._callbacks[10**9] = events.append  # a callback whose sequence never reached the engine
    process_engine._send(("cancel", 10**9))
    assert wait_until(lambda: events and events[-1].finished)
    assert events[-1].finish_reason == "abort" and 10**9 not in process_engine._callbacks


def raw_post(server, path: str, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + path, content=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                               **(headers or {})})


def test_hostile_json_gets_400_not_500(server):
    """Lone surrogates, integers over Python's 4300-digit limit and deep nesting are client errors."""
    chat = '{"model": "tiny", "messages": [{"role": "user", "content": %s}]}'
    cases = {
        "surrogate in content": (chat % '"hi \\ud800 there"').encode(),
        "surrogate in a prompt": b'{"model": "tiny", "prompt": "\\udfff"}',
        "surrogate in a key": b'{"model": "tiny", "prompt": "x", "\\ud800": 1}',
        "huge integer": b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
        "deep nesting": b'{"model": "tiny", "prompt": "x", "user": ' + b"[" * 9000 + b"]" * 9000 + b"}",
    }
    for name, body in cases.items():
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        response = raw_post(server, path, body)
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"]["code"] == "invalid_json" and "Traceback" not in response.text
    emoji = raw_post(server, "/v1/completions", b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}')
    assert emoji.status_code == 200  # a surrogate *pair* is an emoji, and fine


def test_api_requires_json_content_type_and_sends_no_cors_by_default(server, engine):
    body = json.dumps({"model": MODEL, "prompt": "the", "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        response = raw_post(server, "/v1/completions", body, {"Content-Type": content_type})
        assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    ok = raw_post(server, "/v1/completions", body, {"Content-Type": "application/json; charset=utf-8",
                                                     "Origin": "https://evil.example"})
    assert ok.status_code == 200 and not any(h.startswith("access-control") for h in ok.headers)
    preflight = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    app = create_app(engine, MODEL, cors_origins=["https://my.app"])  # configured: that origin only
    with BackgroundServer(app) as allowed:
        preflight = httpx.options(allowed.url + "/v1/completions", headers={
            "Origin": "https://my.app", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.headers["access-control-allow-origin"] == "https://my.app"
        other = httpx.options(allowed.url + "/v1/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_without_a_key_only_loopback_host_names_are_answered(process_server, engine):
    """DNS rebinding: a hostile name resolving to 127.0.0.1 still sends its own name as Host."""
    for host in ("evil.example", "evil.example:8000", "192.168.1.5"):
        response = httpx.get(process_server.url + "/v1/models", headers={"Host": host})
        assert response.status_code == 421 and "--allowed_hosts" in response.json()["error"]["message"]
        assert httpx.get(process_server.url + "/", headers={"Host": host}).status_code == 421
    for host in ("localhost", f"127.0.0.1:{process_server.port}", "[::1]:80", "LOCALHOST:1"):
        assert httpx.get(process_server.url + "/v1/models", headers={"Host": host}).status_code == 200
    with BackgroundServer(create_app(engine, MODEL, allowed_hosts=["my.box"])) as named:
        assert httpx.get(named.url + "/v1/models", headers={"Host": "my.box:8000"}).status_code == 200
        assert httpx.get(named.url + "/v1/models", headers={"Host": "evil.example"}).status_code == 421
    with BackgroundServer(create_app(engine, MODEL, api_key="k")) as keyed:  # a key guards it instead
        assert httpx.get(keyed.url + "/v1/models", headers={"Host": "my.box", "Authorization": "Bearer k"}
                         ).status_code == 200


def test_security_headers_and_a_protected_openapi_document(server, process_server):
    for url in (server.url + "/", server.url + "/static/chat.js", server.url + "/health",
                server.url + "/v1/models"):
        headers = httpx.get(url).headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    schema = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"})
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    assert httpx.get(process_server.url + "/openapi.json").status_code == 200  # no key: public as before


def test_api_keys_are_stripped_or_refused_and_read_from_a_file(engine, tmp_path):
    from acornlm.cli.serve import read_api_key_file
    from acornlm.serve.app import clean_api_key

    assert clean_api_key("  secret-key\n") == "secret-key"
    for bad in ("", "   ", "two words", "tab\there", "ключ"):
        with pytest.raises(ConfigError, match="API key"):
            clean_api_key(bad)
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert clean_api_key(read_api_key_file(str(key_file))) == "from-file"
    for path, problem in ((tmp_path / "missing", "cannot read"), (tmp_path, "cannot read")):
        with pytest.raises(ConfigError, match=problem):
            read_api_key_file(str(path))
    with BackgroundServer(create_app(engine, MODEL, api_key=" padded \n")) as padded:
        ok = httpx.get(padded.url + "/v1/models", headers={"Authorization": "Bearer padded"})
        assert ok.status_code == 200


def test_an_obviously_too_long_prompt_is_refused_before_tokenizing_and_tokenizing_is_off_the_loop(
        checkpoint, monkeypatch):
    engine = load_engine(checkpoint, device="cpu", max_batch=1).start()
    calls: list[str] = []
    real_encode = engine.tokenizer.encode

    def encode(text, *args, **kwargs):
        calls.append(threading.current_thread().name)
        return real_encode(text, *args, **kwargs)

    def render_prompt(tokenizer, messages, **options):
        calls.append(threading.current_thread().name)
        return real_render(tokenizer, messages, **options)

    real_render = __import__("acornlm.serve.app").serve.app.render_prompt
    monkeypatch.setattr(engine.tokenizer, "encode", encode)
    monkeypatch.setattr("acornlm.serve.app.render_prompt", render_prompt)
    try:
        with BackgroundServer(create_app(engine, MODEL)) as server:
            http = httpx.Client(base_url=server.url, timeout=30)
            huge = "the king " * 100_000  # 900 KB: far beyond 256 tokens whatever the tokenizer does
            for path, body in (("/v1/completions", {"prompt": huge}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]})):
                response = http.post(path, json={"model": MODEL, "max_tokens": 2, **body})
                assert response.status_code == 400
                assert response.json()["error"]["code"] == "context_length_exceeded"
            assert calls == []  # refused without tokenizing
            assert http.post("/v1/completions", json={"model": MODEL, "prompt": "the", "max_tokens": 2}
                             ).status_code == 200
            assert http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2}
                             ).status_code == 200
            assert len(calls) == 2 and "acornlm-uvicorn" not in calls  # on worker threads, not the loop's
    finally:
        engine.shutdown()


def test_slow_clients_are_cut_off(engine):
    """Slowloris: a connection that never finishes its headers, or its body, is closed or answered 408."""
    from acornlm.serve.server import ConnectionLimits

    connections = ConnectionLimits(header_timeout_s=0.5, shutdown_timeout_s=1)
    limits = ServerLimits(body_timeout_s=0.5)
    with BackgroundServer(create_app(engine, MODEL, limits=limits), connections=connections) as server:
        assert server._server.config.limit_concurrency == connections.max_connections
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(100) == b""  # closed by the server, never sent a byte
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n")  # headers unfinished
            time.sleep(0.2)
            slow.sendall(b"X-B: 2\r\n")
            assert slow.recv(100) == b""
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as trickle:
            trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                            b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
            reply = b""
            while b"request_timeout" not in reply and (chunk := trickle.recv(1000)):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as kept:  # keep-alive, then idle
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert kept.recv(1000).startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /health HTTP/1.1\r\n")
            deadline = time.monotonic() + 5
            while kept.recv(1000) and time.monotonic() < deadline:
                pass
            assert time.monotonic() < deadline


def test_a_second_sigterm_stops_the_server_at_once():
    from acornlm.serve.server import AcornServer

    server = AcornServer(__import__("uvicorn").Config(lambda scope, receive, send: None))
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and not server.force_exit
    server.handle_exit(signal.SIGTERM, None)
    assert server.force_exit


def start_serve_command(checkpoint, env: dict | None = None, **options) -> tuple[subprocess.Popen, str]:
    """`acornlm serve` (its Python function) in a child process; waits until /health answers."""
    options = {"engine_process": False, **options}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    arguments = ", ".join(f"{k}={v!r}" for k, v in options.items())
    code = (f"from acornlm.cli.serve import serve; serve(ckpt={str(checkpoint)!r}, port={port}, threads=1, "
            f"{arguments})")
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(lambda: up() or process.poll() is not None, seconds=60) and process.poll() is None
    return process, url


def hold_a_request_open(url: str) -> socket.socket:
    """A client that sends headers and half a body, then nothing: its request never completes."""
    port = int(url.rsplit(":", 1)[1])
    stuck = socket.create_connection(("127.0.0.1", port))
    stuck.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer from-file\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    time.sleep(0.3)
    return stuck


def test_serve_shutdown_has_a_timeout_and_a_second_sigterm_stops_at_once(checkpoint, tmp_path):
    """A client that never finishes its request cannot keep the server alive after SIGTERM."""
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    process, url = start_serve_command(checkpoint, api_key_file=str(key_file), shutdown_timeout=1.0,
                                       body_timeout=120.0)
    client = openai.OpenAI(base_url=url + "/v1", api_key="from-file", max_retries=0)
    assert client.models.list().data[0].id == checkpoint.name  # the key from the file works
    stuck = hold_a_request_open(url)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    assert time.monotonic() - started < 10  # 1 s of grace, not the 120 s body timeout
    stuck.close()

    process, url = start_serve_command(checkpoint, api_key_file=str(key_file), shutdown_timeout=120.0,
                                       body_timeout=120.0)
    stuck = hold_a_request_open(url)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert process.poll() is None  # the first signal waits for the open request...
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)  # ...and the second does not
    process.communicate(timeout=30)
    assert time.monotonic() - started < 10
    stuck.close()
