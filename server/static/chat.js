// The chat page. It uses the server's public API exactly as any other front-end would: GET
// /v1/models for the picker, POST /v1/chat/completions with stream: true, the SSE stream parsed
// as it arrives. Model output only ever enters the page as text (textContent), never as HTML.
// Paths are relative, so the page also works behind a proxy that serves the server under a prefix.
"use strict";

const KEY_STORE = "logitspec.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  session: newSessionKey(), // prompt_cache_key: later turns draft from this conversation's earlier answers
  history: [], // completed turns, [{role, content}]
  controller: null, // AbortController of the answer being streamed
  retryText: null, // a message refused for want of a key, sent again once one is given
};

function newSessionKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes); // randomUUID needs a secure context; a plain-http deployment is not one
  return "chat-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---- API key: asked for on a 401, kept in this browser's local storage only ----

function apiKey() {
  try {
    return localStorage.getItem(KEY_STORE) || "";
  } catch {
    return "";
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

function showKeyState() {
  $("forget-key").hidden = !apiKey();
}

// ---- errors in plain words ----

class APIError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status; // HTTP status; "stream" for an error event inside a stream
    this.code = code;
  }
}

async function errorFrom(response) {
  let message = response.statusText || "no details";
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON (a proxy's error page): the status says enough
  }
  return new APIError(response.status, message, code);
}

function plainWords(err) {
  if (err instanceof APIError) {
    switch (err.status) {
      case 401:
        return apiKey()
          ? "The server did not accept this API key. Enter a valid key in the panel on the left."
          : "This server needs an API key. Enter it in the panel on the left.";
      case 400:
        return "The server did not accept the request: " + err.message;
      case 404:
        return "Not found: " + err.message;
      case 413:
        return "The conversation is too large for this server: " + err.message;
      case 429:
        return "The server is busy right now. Please try again in a moment.";
      case 503:
        return "The server is not taking requests right now (it may be shutting down). Try again shortly.";
      case 504:
        return "The answer took too long and the server gave up on it.";
      case "stream":
        return "The answer failed while it was being written: " + err.message;
      default:
        return `The server answered with an error (${err.status}): ${err.message}`;
    }
  }
  if (err instanceof TypeError) return "Could not reach the server. Is it still running?";
  return "Something went wrong: " + err.message;
}

function notice(text) {
  const p = document.createElement("p");
  p.className = "notice error";
  p.textContent = text;
  $("transcript").append(p);
  scrollDown(true);
}

// ---- SSE: an async iterator over the events of a fetch response body ----

async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  let type = "message";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let m;
    while ((m = /\r\n|\r|\n/.exec(buffer))) {
      if (m[0] === "\r" && m.index === buffer.length - 1) break; // maybe half of a \r\n: wait
      const line = buffer.slice(0, m.index);
      buffer = buffer.slice(m.index + m[0].length);
      if (line === "") {
        if (data.length) yield { type, data: data.join("\n") };
        data = [];
        type = "message";
      } else if (!line.startsWith(":")) { // ":" starts a comment (the server's keep-alive pings)
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "data") data.push(val);
        else if (field === "event") type = val;
      }
    }
  }
}

// ---- transcript ----

function scrollDown(force) {
  const t = $("transcript");
  if (force || t.scrollHeight - t.scrollTop - t.clientHeight < 80) t.scrollTop = t.scrollHeight;
}

function bubble(role) {
  $("empty").hidden = true;
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  div.append(who, body);
  $("transcript").append(div);
  scrollDown(true);
  return div;
}

function stat(parent, name, value, unit) {
  const s = document.createElement("span");
  s.className = "stat";
  const v = document.createElement("b");
  v.dataset.stat = name;
  v.textContent = value;
  s.append(v, " " + unit);
  parent.append(s);
}

function fmt(x, digits) {
  return Number.isFinite(x) ? x.toFixed(digits) : "–";
}

// Live figures of the answer being streamed, and its totals once the server sends them.
class Answer {
  constructor(div, method) {
    this.div = div;
    this.body = div.querySelector(".body");
    this.method = method;
    this.text = "";
    this.tokens = 0; // sum of step_tokens
    this.steps = 0; // content chunks that carried tokens
    this.sent = performance.now();
    this.first = null; // when the first tokens arrived
    this.firstTokens = 0;
    this.final = null; // the response's speculative totals
    this.usage = null;
    this.finish = null;
  }

  add(text, k) {
    const now = performance.now();
    if (k > 0) {
      if (this.first === null) {
        this.first = now;
        this.firstTokens = k;
      }
      this.steps += 1;
      this.tokens += k;
    }
    const span = document.createElement("span");
    const shade = Math.min(Math.max(k, 1), 5);
    span.className = `step k${shade}` + (this.steps % 2 ? "" : " alt");
    span.title = k > 0 ? `step ${this.steps}: ${k} token${k === 1 ? "" : "s"}` : "held back until the text was complete";
    span.textContent = text; // never HTML
    this.body.append(span);
    this.text += text;
    this.live();
    scrollDown(false);
  }

  // Decoding rate: tokens after the first step over the time since it (prefill is not speculation's).
  tps() {
    if (this.first === null) return NaN;
    const seconds = (performance.now() - this.first) / 1000;
    return seconds > 0 && this.steps > 1 ? (this.tokens - this.firstTokens) / seconds : NaN;
  }

  live() {
    const set = (name, v) => (document.querySelector(`[data-live="${name}"]`).textContent = v);
    const steps = this.final ? this.final.steps : this.steps;
    const mat = this.final ? this.final.mean_accepted_tokens : this.tokens / this.steps;
    const tokens = this.usage ? this.usage.completion_tokens : this.tokens;
    set("tps", fmt(this.tps(), 1));
    set("mat", this.steps ? fmt(mat, 2) : "–");
    set("steps", String(steps));
    set("tokens", String(tokens));
  }

  end(status) {
    this.tpsFinal = this.tps();
    this.live();
    const foot = document.createElement("div");
    foot.className = "stats";
    const tokens = this.usage ? this.usage.completion_tokens : this.tokens;
    stat(foot, "tokens", String(tokens), "tokens");
    stat(foot, "steps", String(this.final ? this.final.steps : this.steps), "steps");
    const mat = this.final ? this.final.mean_accepted_tokens : this.tokens / this.steps;
    stat(foot, "mat", this.steps ? fmt(mat, 2) : "–", "accepted/step");
    stat(foot, "tps", fmt(this.tpsFinal, 1), "tok/s");
    if (this.first !== null) stat(foot, "ttft", fmt((this.first - this.sent) / 1000, 2), "s to first token");
    if (this.usage) {
      stat(foot, "prompt", String(this.usage.prompt_tokens), "prompt tokens");
      stat(foot, "total", String(this.usage.total_tokens), "total");
    }
    const m = document.createElement("span");
    m.className = "stat method";
    m.textContent = this.method;
    foot.append(m);
    if (status) {
      const s = document.createElement("span");
      s.className = "stat status";
      s.textContent = status;
      foot.append(s);
    }
    this.div.append(foot);
  }

  fail(text) {
    const p = document.createElement("p");
    p.className = "error";
    p.textContent = text;
    this.div.append(p);
    this.div.classList.add("failed");
  }
}

// ---- sending ----

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function requestBody(messages) {
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: number("temperature"),
    max_tokens: number("max-tokens"),
    speculative: { method: $("method").value },
    prompt_cache_key: state.session,
  };
  if ($("model").value) body.model = $("model").value;
  return body;
}

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("streaming", on);
}

async function send(text) {
  if (state.controller || !text.trim()) return;
  const system = $("system").value.trim();
  const turn = { role: "user", content: text };
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history, turn];
  const userDiv = bubble("user");
  userDiv.querySelector(".body").textContent = text;
  const answer = new Answer(bubble("assistant"), $("method").value);
  answer.live();
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  const session = state.session;
  const remember = (reply) => { // not into a conversation that "New chat" started meanwhile
    if (state.session === session) state.history.push(turn, { role: "assistant", content: reply });
  };
  let status = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: controller.signal,
    });
    if (!response.ok) throw await errorFrom(response);
    let done = false;
    for await (const ev of sseEvents(response.body)) {
      if (ev.type === "error") {
        let message = ev.data;
        try {
          message = JSON.parse(ev.data).error.message;
        } catch {
          // keep the raw text
        }
        throw new APIError("stream", message);
      }
      if (ev.data === "[DONE]") {
        done = true;
        break;
      }
      const chunk = JSON.parse(ev.data);
      if (chunk.usage) answer.usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const spec = chunk.speculative || {};
      const content = choice.delta && choice.delta.content;
      if (content) answer.add(content, spec.step_tokens ?? 1);
      if (choice.finish_reason) {
        answer.finish = choice.finish_reason;
        if (spec.steps !== undefined) answer.final = spec;
      }
    }
    if (!done) throw new Error("the connection closed before the answer was complete");
    if (answer.finish === "length") status = "stopped at max tokens";
    remember(answer.text);
  } catch (err) {
    if (err.name === "AbortError") {
      status = "stopped";
      if (answer.text) remember(answer.text);
    } else if (err instanceof APIError && err.status === 401) {
      // nothing was said: take the turn back and send it again once a key is given
      userDiv.remove();
      answer.div.remove();
      state.retryText = text;
      $("input").value = text;
      notice(plainWords(err));
      askForKey();
      return;
    } else {
      answer.fail(plainWords(err));
      status = "failed";
    }
  } finally {
    state.controller = null;
    setStreaming(false);
  }
  answer.end(status);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.session = newSessionKey();
  state.history = [];
  const t = $("transcript");
  for (const el of [...t.children]) if (el.id !== "empty") el.remove();
  $("empty").hidden = false;
  for (const el of document.querySelectorAll("[data-live]")) el.textContent = "–";
  $("input").focus();
}

async function loadModels() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) throw await errorFrom(response);
    const { data } = await response.json();
    const select = $("model");
    select.replaceChildren();
    for (const m of data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id;
      select.append(opt);
    }
    return true;
  } catch (err) {
    notice("Could not list the models. " + plainWords(err));
    if (err instanceof APIError && err.status === 401) askForKey();
    return false;
  }
}

function init() {
  const composer = $("composer");
  const input = $("input");
  composer.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value;
    if (!text.trim() || state.controller) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      composer.requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    try {
      localStorage.setItem(KEY_STORE, key);
    } catch {
      notice("This browser does not allow local storage, so the key cannot be kept.");
      return;
    }
    $("api-key").value = "";
    $("key-form").hidden = true;
    showKeyState();
    for (const n of document.querySelectorAll(".notice")) n.remove();
    if (!(await loadModels())) return;
    const retry = state.retryText;
    state.retryText = null;
    if (retry && input.value === retry) {
      input.value = "";
      send(retry);
    }
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    showKeyState();
  });
  showKeyState();
  loadModels();
  input.focus();
}

document.addEventListener("DOMContentLoaded", init);
