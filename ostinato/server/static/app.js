// Ostinato chat page: plain JS, no dependencies, nothing loaded from outside the server.
// Safety rule: model (and user) text is HTML-escaped before any tag is added; the only
// innerHTML assignments take the output of renderMarkdown, which builds on escaped text.
"use strict";

// ---------------------------------------------------------------------------- Markdown
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// One line of already-escaped text -> inline tags. Code spans first, so their content is
// never read as bold/italic (odd parts of the split are the spans).
function inline(escaped) {
  return escaped.split(/(`[^`]+`)/).map((part, i) => (i % 2
    ? "<code>" + part.slice(1, -1) + "</code>"
    : part
      .replace(/\*\*(?=\S)(.+?)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*(?=\S)([^*]+?)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_(?=\S)([^_]+?)_(?!\w)/g, "$1<em>$2</em>"))).join("");
}

function codeBlock(lang, lines) {
  // lang matched [\w+#.-]* on escaped text: it cannot leave the attribute
  const cls = lang ? ` class="language-${lang}"` : "";
  return `<pre><code${cls}>${lines.join("\n")}</code></pre>`;
}

// Markdown subset: ``` fences, `code`, **bold**, *italic*/_italic_, - and 1. lists,
// # headings, paragraphs. An unclosed fence (mid-stream) renders as a code block.
function renderMarkdown(text) {
  const lines = escapeHtml(String(text).replace(/\r\n?/g, "\n")).split("\n");
  const out = [];
  let para = [], list = null, fence = null;
  const flushPara = () => {
    if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
    para = [];
  };
  const flushList = () => {
    if (list) {
      const items = list.items.map((it) => "<li>" + inline(it) + "</li>").join("");
      out.push(`<${list.tag}>${items}</${list.tag}>`);
    }
    list = null;
  };
  for (const line of lines) {
    if (fence) {
      if (/^\s*```\s*$/.test(line)) {
        out.push(codeBlock(fence.lang, fence.lines));
        fence = null;
      } else fence.lines.push(line);
      continue;
    }
    const f = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
    const h = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*(?:([-*+])|\d{1,9}[.)])\s+(.*)$/);
    if (f || h || item || !line.trim()) flushPara();
    if (f || h || !line.trim()) flushList();
    if (f) fence = { lang: f[1], lines: [] };
    else if (h) {
      const n = Math.min(h[1].length + 2, 6);        // # -> h3: answers stay below the page's h1
      out.push(`<h${n}>${inline(h[2])}</h${n}>`);
    } else if (item) {
      const tag = item[1] ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      list = list || { tag, items: [] };
      list.items.push(item[2]);
    } else if (line.trim()) {
      flushList();
      para.push(line);
    }
  }
  if (fence) out.push(codeBlock(fence.lang, fence.lines));
  flushPara();
  flushList();
  return out.join("");
}

// ---------------------------------------------------------------------------- page state
const $ = (id) => document.getElementById(id);
const state = {
  history: [],            // [{role, content}] of the conversation, without the system prompt
  key: sessionStorage.getItem("ostinato.apiKey") || "",
  model: null,
  controller: null,       // AbortController of the answer in flight
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.dataset.kind = kind || "";
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// ---------------------------------------------------------------------------- API key
function askForKey(message) {
  const form = $("key-form");
  form.hidden = false;
  $("key-help").textContent = message;
  setStatus("an API key is needed", "error");
  $("api-key").focus();
}

async function checkAccess() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    askForKey(state.key ? "That key was refused; enter the server's --api-key."
      : "This server needs an API key (its --api-key). It is kept in this tab only.");
    return false;
  }
  if (!r.ok) throw new Error(await errorMessage(r));
  $("key-form").hidden = true;
  const models = await r.json();
  state.model = models.data[0].id;
  setStatus(`${state.model} · ready`, "ok");
  return true;
}

// Waits for /health (503 while the model loads), then checks the key.
async function connect() {
  for (;;) {
    try {
      const r = await fetch("/health");
      const body = await r.json().catch(() => ({}));
      if (r.ok) return await checkAccess();
      if (body.status === "error") {
        setStatus("the server failed: " + body.error, "error");
        return false;
      }
      setStatus("loading the model…", "busy");
    } catch (e) {
      setStatus("cannot reach the server: " + e.message, "error");
    }
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}

// ---------------------------------------------------------------------------- messages
function addMessage(role, text) {
  const box = document.createElement("article");
  box.className = "message " + role;
  const who = document.createElement("h2");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "content";
  if (role === "user") body.textContent = text;      // shown as typed: never parsed
  const stats = document.createElement("p");
  stats.className = "stats";
  box.append(who, body, stats);
  $("log").append(box);
  scrollDown();
  return { box, body, stats };
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

// Stats of one answer: ttft and rate in seconds / tokens per second; tokens counted from
// stream chunks until the server's usage gives the exact count.
function showStats(view, s) {
  const parts = [];
  const waiting = s.first === null;
  const ttft = ((waiting ? performance.now() : s.first) - s.start) / 1000;
  parts.push(`<span class="ttft">${waiting ? "waiting" : "TTFT"} ${ttft.toFixed(2)} s</span>`);
  if (s.first !== null) {
    const secs = (s.last - s.first) / 1000;
    const rate = s.tokens > 1 && secs > 0 ? (s.tokens - 1) / secs : 0;
    parts.push(`<span class="rate">${rate.toFixed(1)} tok/s</span>`);
  }
  const n = s.usage ? s.usage.completion_tokens : s.tokens;
  parts.push(`<span class="tokens">${n} tokens${s.usage ? "" : " (streamed)"}</span>`);
  if (s.usage) {
    parts.push(`<span class="prompt-tokens">${s.usage.prompt_tokens} prompt tokens</span>`);
  }
  if (s.end) parts.push(`<span class="finish">${escapeHtml(s.end)}</span>`);
  view.stats.innerHTML = parts.join(" · ");       // numbers and escaped text only
}

// ---------------------------------------------------------------------------- streaming
// Server-sent events of a fetch body -> the data payload of each event.
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody() {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.history]
    : state.history;
  const body = { model: state.model, messages, stream: true,
    stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value) };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

async function send(text) {
  if (state.controller || !state.model) return;
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const view = addMessage("assistant", "");
  view.box.setAttribute("aria-busy", "true");
  const s = { start: performance.now(), first: null, last: null, tokens: 0, usage: null, end: "" };
  state.controller = new AbortController();
  setBusy(true);
  const ticker = setInterval(() => showStats(view, s), 100);    // live TTFT while waiting
  let reply = "", frame = 0;
  const paint = () => { frame = 0; view.body.innerHTML = renderMarkdown(reply); scrollDown(); };
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(requestBody()), signal: state.controller.signal });
    if (r.status === 401) askForKey("The server refused the API key; enter it again.");
    if (!r.ok) throw new Error(await errorMessage(r));
    for await (const data of sseData(r.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) s.usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        s.last = performance.now();
        if (s.first === null) s.first = s.last;
        s.tokens += 1;
        reply += piece;
        if (!frame) frame = requestAnimationFrame(paint);
      }
      if (choice.finish_reason) s.end = "finish: " + choice.finish_reason;
    }
    state.history.push({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name === "AbortError") {
      s.end = "stopped";
      state.history.push({ role: "assistant", content: reply });   // keep what came
    } else {
      s.end = "error: " + e.message;
      view.box.classList.add("error");
      state.history.pop();          // the failed question is not sent again next time
    }
  } finally {
    clearInterval(ticker);
    if (frame) cancelAnimationFrame(frame);
    paint();
    showStats(view, s);
    view.box.removeAttribute("aria-busy");
    view.box.dataset.done = s.end || "done";
    state.controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

function stop() {
  if (state.controller) state.controller.abort();     // closes the connection: the server aborts
}

// ---------------------------------------------------------------------------- wiring
function init() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    stop();
    state.history = [];
    $("log").replaceChildren();
    $("prompt").focus();
  });
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = $("temperature").value;
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("ostinato.apiKey", state.key);
    checkAccess().then((ok) => { if (ok) $("prompt").focus(); })
      .catch((err) => setStatus(err.message, "error"));
  });
  connect().catch((err) => setStatus(err.message, "error"));
  $("prompt").focus();
}

window.ostinato = { renderMarkdown, escapeHtml, state };     // for tests and the console
document.addEventListener("DOMContentLoaded", init);
