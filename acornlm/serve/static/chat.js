// The chat page: a client of the server's OpenAI-compatible API, like any other.
//
// It keeps the chat in `conversation` ({role, content} messages), sends it to
// POST /v1/chat/completions with stream: true, and reads the server-sent events
// ("data: {chunk}" ... "data: [DONE]") as they arrive. Stop aborts the request (the server
// then frees the model's slot); Regenerate drops the last reply and asks again.
//
// A reply has up to three parts, as the server splits them: `reasoning_content` deltas (the
// model's thinking, shown in a collapsed "Thinking" block), `content` deltas (the answer) and
// `tool_calls` (shown as cards: the function's name and its arguments as indented JSON). The page
// sends no tools, so the server only returns calls if a proxy in between adds tools; the cards are
// shown and the call is kept out of the conversation (it would need a tool result to continue).
//
// Model output is untrusted text: it is only ever put into the page with textContent
// (never innerHTML), so a reply containing <script> or <img onerror=...> shows as text.
// A small Markdown subset (``` code blocks, `inline code`, **bold**) is rendered by
// building DOM nodes.

"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system-prompt", "temperature", "top-p", "top-k", "max-tokens", "thinking", "api-key"];

let conversation = [];     // the messages sent to the server
let modelName = null;      // from GET /v1/models
let controller = null;     // AbortController of the reply being generated

// ------------------------------------------------------------------ settings

// The API key lives in sessionStorage (gone when the tab closes, never shared with other tabs);
// the other settings in localStorage, so they survive a restart of the browser.
const storageOf = (id) => (id === "api-key" ? sessionStorage : localStorage);

function loadSettings() {
  localStorage.removeItem("acornlm.api-key");  // written there by earlier versions of this page
  for (const id of SETTINGS) {
    const saved = storageOf(id).getItem("acornlm." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => storageOf(id).setItem("acornlm." + id, $(id).value));
  }
}

function numberSetting(id) {
  const value = Number($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// ------------------------------------------------------------------ rendering (no innerHTML)

function renderInline(parent, text) {
  // `code` and **bold** inside a paragraph; everything else is plain text.
  const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    parent.append(document.createTextNode(text.slice(last, match.index)));
    const token = match[0];
    const node = document.createElement(token.startsWith("`") ? "code" : "strong");
    node.textContent = token.startsWith("`") ? token.slice(1, -1) : token.slice(2, -2);
    parent.append(node);
    last = match.index + token.length;
  }
  parent.append(document.createTextNode(text.slice(last)));
}

function renderMarkdown(container, text) {
  container.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) {  // inside a code fence: the first line may name the language
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/^[\w+-]*\n/, "");
      pre.append(code);
      container.append(pre);
    } else {
      for (const paragraph of part.split(/\n{2,}/)) {
        if (!paragraph) continue;
        const p = document.createElement("p");
        renderInline(p, paragraph);
        container.append(p);
      }
    }
  });
}

// The reply's thinking: a <details> block, collapsed unless the reader opens it.
function renderReasoning(box, text, streaming) {
  let details = box.querySelector("details.thinking");
  if (!details) {
    details = document.createElement("details");
    details.className = "thinking";
    const summary = document.createElement("summary");
    const body = document.createElement("div");
    body.className = "reasoning";
    details.append(summary, body);
    box.querySelector(".role").after(details);
  }
  details.querySelector("summary").textContent = streaming ? "Thinking..." : "Thinking";
  details.querySelector(".reasoning").textContent = text;
}

// Arguments arrive as a JSON string; shown indented when they parse, as they are otherwise.
function prettyArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

function renderToolCalls(box, calls) {
  let list = box.querySelector(".tool-calls");
  if (!list) {
    list = document.createElement("div");
    list.className = "tool-calls";
    box.querySelector(".content").after(list);
  }
  list.replaceChildren();
  for (const call of calls) {
    const card = document.createElement("div");
    card.className = "tool-call";
    const name = document.createElement("div");
    name.className = "tool-name";
    name.textContent = call.name;
    const args = document.createElement("pre");
    args.className = "tool-arguments";
    args.textContent = prettyArguments(call.arguments);
    card.append(name, args);
    list.append(card);
  }
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "message " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  box.append(label, content);
  renderMarkdown(content, text);
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function showError(message) {
  const box = document.createElement("div");
  box.className = "message error";
  box.textContent = message;
  $("messages").append(box);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("regenerate").hidden = busy || !conversation.some((m) => m.role === "assistant");
}

// ------------------------------------------------------------------ talking to the server

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function fetchModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    modelName = (await response.json()).data[0].id;
    $("model-name").textContent = modelName;
  } catch (error) {
    $("model-name").textContent = "not connected: " + error.message;
  }
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = {
    model: modelName ?? undefined,
    messages,
    stream: true,
    temperature: numberSetting("temperature"),
    top_p: numberSetting("top-p"),
    top_k: numberSetting("top-k"),
    max_tokens: numberSetting("max-tokens"),
  };
  // "" = the model's default; "on" / "off" = enable_thinking, as vLLM's chat_template_kwargs say it
  const thinking = $("thinking").value;
  if (thinking) body.chat_template_kwargs = { enable_thinking: thinking === "on" };
  return body;
}

// Yields the parsed JSON of each "data: ..." event until "data: [DONE]".
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function generateReply() {
  const box = addMessage("assistant", "");
  box.classList.add("streaming");
  const content = box.querySelector(".content");
  let reply = "";
  let reasoning = "";
  const calls = [];   // by index: {name, arguments}, arguments a JSON string
  let problems = null;
  let finish = null;
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of serverSentEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta ?? {};
      if (delta.reasoning_content) {
        reasoning += delta.reasoning_content;
        renderReasoning(box, reasoning, true);
      }
      if (delta.content) {
        reply += delta.content;
        renderMarkdown(content, reply);
      }
      for (const call of delta.tool_calls ?? []) {
        const entry = (calls[call.index ?? calls.length] ??= { name: "", arguments: "" });
        entry.name += call.function?.name ?? "";
        entry.arguments += call.function?.arguments ?? "";
        renderToolCalls(box, calls.filter(Boolean));
      }
      if (delta.reasoning_content || delta.content || delta.tool_calls) box.scrollIntoView({ block: "end" });
      if (choice.finish_reason) {
        finish = choice.finish_reason;
        problems = choice.tool_call_problems ?? null;
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      finish = "stopped";
    } else {
      showError(error.message);
      finish = "error";
    }
  } finally {
    controller = null;
    box.classList.remove("streaming");
    box.dataset.finish = finish ?? "";
    if (reasoning) renderReasoning(box, reasoning, false);
    const notes = [];
    if (finish === "length") notes.push("(cut at max tokens)");
    if (finish === "stopped") notes.push("(stopped)");
    if (problems) notes.push("(tool call not accepted: " + problems.join("; ") + ")");
    for (const note of notes) {
      const status = document.createElement("div");
      status.className = "status";
      status.textContent = note;
      box.append(status);
    }
    if (finish === "error" && !reply && !reasoning) box.remove();
    else {
      const message = { role: "assistant", content: reply };
      if (reasoning) message.reasoning_content = reasoning;  // the chat template keeps earlier thinking
      conversation.push(message);
    }
    setBusy(false);
  }
}

// ------------------------------------------------------------------ user actions

async function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  await generateReply();
}

async function regenerate() {
  if (controller || conversation.at(-1)?.role !== "assistant") return;
  conversation.pop();
  const replies = $("messages").querySelectorAll(".message.assistant");
  replies[replies.length - 1]?.remove();
  await generateReply();
}

function newChat() {
  if (controller) controller.abort();
  conversation = [];
  $("messages").replaceChildren();
  setBusy(false);
}

function init() {
  loadSettings();
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (event) => {
    // Enter also confirms a candidate in a Chinese/Japanese input method: while composing it is not "send".
    if (event.isComposing || event.keyCode === 229) return;
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("new-chat").addEventListener("click", newChat);
  $("settings-toggle").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("api-key").addEventListener("change", fetchModel);
  fetchModel();
}

init();
