"""The web chat page in headless Chromium (Debian's `chromium`, driven by Playwright).

tests/setup_browser.sh installs /usr/bin/chromium (make test runs it); Playwright's own browser
download is never used.
"""

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from acornlm.infer.engine import Engine
from acornlm.model import ModelConfig, Transformer
from acornlm.serve.app import create_app
from acornlm.serve.server import BackgroundServer
from acornlm.tokenizer import train_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_COPY = Path("/tmp/acornlm-web.png")
API_KEY = "page-key"
MODEL = "tiny-web"


class SlowEngine(Engine):
    """An engine that takes ~10 ms per step, so a reply is still streaming when the test clicks Stop."""

    def step(self) -> bool:
        if self.num_running:
            time.sleep(0.01)
        return super().step()


@pytest.fixture(scope="module")
def server():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model; threads only add hand-off latency
    tokenizer = train_tokenizer(["The king speaks to the queen near the river at night."] * 5, "bpe", 280)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                         initializer_range=0.3)
    engine = SlowEngine(Transformer(config).eval(), tokenizer, max_batch=2, stop_token_ids=[]).start()
    try:
        with BackgroundServer(create_app(engine, MODEL, api_key=API_KEY)) as server:
            server.engine = engine
            yield server
    finally:
        engine.shutdown()
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run `bash tests/setup_browser.sh` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(server, browser):
    # Playwright's wait_for_function evaluates strings, which the page's Content-Security-Policy
    # forbids (as it should); test_the_page_runs_under_its_content_security_policy covers the CSP.
    page = browser.new_page(viewport={"width": 1000, "height": 800}, bypass_csp=True)
    page.set_default_timeout(20_000)
    page.goto(server.url + "/")
    yield page
    page.close()


def test_the_page_runs_under_its_content_security_policy(server, browser):
    """With the CSP enforced, the page's own script and style load, it calls the API (401 without
    the key), and the browser reports no violation."""
    page = browser.new_page()
    messages: list[str] = []
    page.on("console", lambda message: messages.append(message.text))
    response = page.goto(server.url + "/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    deadline = time.monotonic() + 20
    while "401" not in (page.locator("#model-name").text_content() or "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "401" in page.locator("#model-name").text_content()
    assert page.locator("#settings-toggle").evaluate("e => getComputedStyle(e).cursor") == "pointer"  # chat.css loaded
    assert not [m for m in messages if "Content Security Policy" in m], messages
    page.close()


def last_reply(page):
    return page.locator(".message.assistant").last


def test_chat_page_streams_replies_and_obeys_settings_and_stop(page, server, tmp_path):
    # Without the API key the page cannot list models; entering it in the settings connects.
    page.wait_for_function("document.getElementById('model-name').textContent.includes('401')")
    page.click("#settings-toggle")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{MODEL}'")
    # The key stays in this tab only (sessionStorage), never in localStorage, which outlives it.
    assert page.evaluate("sessionStorage.getItem('acornlm.api-key')") == API_KEY
    assert page.evaluate("localStorage.getItem('acornlm.api-key')") is None

    # Change settings, send a message, watch the reply stream in.
    page.fill("#system-prompt", "Be brief.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    page.evaluate("""() => {
        window.contentUpdates = 0;
        new MutationObserver(() => window.contentUpdates++)
            .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#input", "the king")
    with page.expect_request("**/v1/chat/completions") as request_info:
        page.press("#input", "Enter")
    sent = json.loads(request_info.value.post_data)
    assert sent["temperature"] == 0 and sent["max_tokens"] == 12 and sent["stream"] is True
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the king"}]
    page.wait_for_selector(".message.assistant[data-finish='length']")
    assert page.evaluate("window.contentUpdates") > 4  # piece by piece, not one block at the end

    # The page shows what the API returns for the same request.
    expected = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={**sent, "stream": False}, timeout=30).json()["choices"][0]["message"]["content"]
    assert page.evaluate("conversation.at(-1).content") == expected
    assert page.locator(".message.user").last.inner_text().endswith("the king")

    # Stop a long generation: the reply ends where it was, and the server frees the slot.
    aborted = server.engine.finished["abort"]
    page.fill("#temperature", "1")
    page.fill("#max-tokens", "400")
    page.fill("#input", "the queen")
    page.click("#send")
    page.wait_for_selector("#stop:not([hidden])")
    page.wait_for_function("document.querySelectorAll('.message.assistant')[1]?.textContent.length > 20")
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-finish='stopped']")
    assert page.locator("#stop").is_hidden() and page.locator("#regenerate").is_visible()
    deadline = time.monotonic() + 10
    while server.engine.finished["abort"] == aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.engine.finished["abort"] == aborted + 1 and server.engine.num_running == 0
    stopped_reply = page.evaluate("conversation.at(-1).content")
    assert len(stopped_reply) > 0

    # Regenerate replaces the last reply.
    page.fill("#max-tokens", "6")
    page.click("#regenerate")
    page.wait_for_function(
        "document.querySelectorAll('.message.assistant')[1]?.dataset.finish === 'length'")
    assert page.locator(".message.assistant").count() == 2
    assert page.evaluate("conversation.length") == 4

    screenshot = tmp_path / "acornlm-web.png"
    page.screenshot(path=str(screenshot), full_page=True)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    assert screenshot.stat().st_size > 1000


def test_model_output_is_rendered_as_text_never_as_html(page):
    rendered = page.evaluate("""() => {
        window.injected = false;
        const box = document.createElement('div');
        renderMarkdown(box, 'Hi <img src=x onerror="window.injected=true"> <script>window.injected=true</script>' +
                            ' **bold** and `code`\\n\\n```js\\nlet a = "<b>";\\n```');
        document.body.append(box);
        return {
            html: box.innerHTML,
            text: box.textContent,
            tags: [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
            strong: box.querySelector('strong')?.textContent,
            code: box.querySelector('pre code')?.textContent,
        };
    }""")
    assert set(rendered["tags"]) <= {"p", "strong", "code", "pre"}
    assert "<img" in rendered["text"] and "&lt;img" in rendered["html"]
    assert rendered["strong"] == "bold" and rendered["code"] == 'let a = "<b>";\n'
    page.wait_for_timeout(100)  # give an injected handler the chance to run
    assert page.evaluate("window.injected") is False


def test_enter_while_an_input_method_composes_does_not_send(page):
    """Chinese input methods confirm a candidate with Enter: that Enter is part of typing, not "send"."""
    sent = page.evaluate("""() => {
        let submitted = 0;
        const form = document.getElementById('composer');
        const count = (event) => { submitted++; event.preventDefault(); event.stopImmediatePropagation(); };
        form.addEventListener('submit', count, {capture: true});
        const input = document.getElementById('input');
        input.value = '你好';
        input.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', isComposing: true, bubbles: true, cancelable: true}));
        input.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', keyCode: 229, bubbles: true, cancelable: true}));
        const whileComposing = submitted;
        input.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true, cancelable: true}));
        form.removeEventListener('submit', count, {capture: true});
        input.value = '';
        return [whileComposing, submitted];
    }""")
    assert sent == [0, 1]


def sse_body(*deltas: dict, finish: str = "stop", **final) -> str:
    """A streamed chat reply as the server writes it: one chunk per delta, a finish chunk, [DONE]."""
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    chunks += [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish, **final}]})
    return "".join(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def test_thinking_is_collapsed_and_tool_calls_are_cards(browser, server):
    """The page's rendering of reasoning_content and tool_calls deltas (the reply is canned: a tiny random
    model writes neither; tests/test_serve_tools.py covers the server's side of the same chunks)."""
    page = browser.new_page(bypass_csp=True)
    page.set_default_timeout(20_000)
    replies = [
        sse_body({"reasoning_content": "先想一想 🤔\n"}, {"reasoning_content": "then <b>answer</b>"},
                 {"content": "答案是 **42**"}),
        sse_body({"reasoning_content": "need the weather"},
                 {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 2}'}}]},
                 finish="tool_calls"),
        sse_body({"content": "<tool_call>oops"}, tool_call_problems=["a tool call is not valid JSON"]),
    ]
    sent: list[dict] = []

    def reply(route) -> None:
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=replies[len(sent) - 1])

    page.route("**/v1/chat/completions", reply)
    page.goto(server.url + "/")
    page.click("#settings-toggle")
    page.select_option("#thinking", "off")
    page.dispatch_event("#thinking", "change")
    page.fill("#input", "the king")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant[data-finish='stop']")
    assert sent[0]["chat_template_kwargs"] == {"enable_thinking": False}
    first = page.locator(".message.assistant").last
    thinking = first.locator("details.thinking")
    assert thinking.get_attribute("open") is None  # collapsed
    assert thinking.locator("summary").inner_text() == "Thinking"
    assert thinking.locator(".reasoning").text_content() == "先想一想 🤔\nthen <b>answer</b>"  # text, not HTML
    assert first.locator(".content strong").inner_text() == "42"
    assert page.evaluate("conversation.at(-1)") == {"role": "assistant", "content": "答案是 **42**",
                                                     "reasoning_content": "先想一想 🤔\nthen <b>answer</b>"}
    thinking.locator("summary").click()
    assert thinking.locator(".reasoning").is_visible()

    page.fill("#input", "weather?")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant[data-finish='tool_calls']")
    card = page.locator(".message.assistant").last.locator(".tool-call")
    assert card.count() == 1 and card.locator(".tool-name").inner_text() == "get_weather"
    assert card.locator(".tool-arguments").text_content() == '{\n  "city": "北京",\n  "days": 2\n}'
    assert sent[1]["messages"][-2]["reasoning_content"] == "先想一想 🤔\nthen <b>answer</b>"

    page.fill("#input", "again")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant[data-finish='stop'] >> nth=1")
    last = page.locator(".message.assistant").last
    assert last.locator(".content").inner_text() == "<tool_call>oops"
    assert "tool call not accepted: a tool call is not valid JSON" in last.locator(".status").inner_text()
    page.close()
