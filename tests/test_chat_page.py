"""The chat page at `/` in a real headless Chromium (Debian's, driven by Playwright; no browser
download) against a live server on the real default model: greedy answers shown exactly as the API
gives them, speculation statistics, one session key per conversation, Stop freeing the slot, API
errors in plain words, the API key prompt, and model output that is shown as text, never run."""

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from server_process import ROOT, ServerProcess

pytestmark = pytest.mark.slow

SCREENSHOT = ROOT / "docs" / "chat_page.png"
STATIC = ROOT / "server" / "static"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY = "sk-chat-page-test-key"


def missing(message: str):
    """CI installs the browser (scripts/install.sh), so there a missing one is a failure; elsewhere a skip."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        missing("chromium is not installed: scripts/install.sh installs the Debian packages chromium and chromium-driver")
    return path


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed: it is in the project's test extra")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-context", "2048", "--max-running", "4")
    yield s
    s.stop()


class Page:
    """One browser tab on the chat page, recording the chat requests it sends."""

    def __init__(self, browser, url: str):
        # bypass_csp: Playwright's waits evaluate JavaScript, which the page's policy forbids (it is
        # checked on its own below); the page's code then runs without that safety net.
        self.context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=url, bypass_csp=True)
        self.tab = self.context.new_page()
        self.errors: list[str] = []
        self.sent: list = []  # playwright Request objects to /v1/chat/completions
        self.tab.on("pageerror", lambda e: self.errors.append(str(e)))
        self.tab.on("request", lambda r: self.sent.append(r) if r.url.endswith("/v1/chat/completions") else None)
        self.tab.goto("/")

    def wait_for_models(self) -> None:
        self.tab.wait_for_function("document.querySelector('#model').options.length > 0", timeout=30_000)

    def configure(self, method: str = "logitspec", temperature: str = "0", max_tokens: str = "40") -> None:
        self.tab.select_option("#method", method)
        self.tab.fill("#temperature", temperature)
        self.tab.fill("#max-tokens", max_tokens)

    def ask(self, text: str, timeout: float = 90_000) -> dict:
        """Type a message, send it with Enter, wait for the answer to end; its text and statistics."""
        done = self.tab.locator(".msg.assistant .stats").count()
        self.tab.fill("#input", text)
        self.tab.press("#input", "Enter")
        self.tab.wait_for_function(f"document.querySelectorAll('.msg.assistant .stats').length > {done}",
                                   timeout=timeout)
        return self.last_answer()

    def last_answer(self) -> dict:
        return self.tab.evaluate("""() => {
            const a = [...document.querySelectorAll('.msg.assistant')].at(-1);
            const stats = Object.fromEntries([...a.querySelectorAll('[data-stat]')].map(e => [e.dataset.stat, e.textContent]));
            const steps = [...a.querySelectorAll('.body .step')].map(s => s.className);
            const error = a.querySelector('.error');
            return {text: a.querySelector('.body').textContent, stats, steps, error: error && error.textContent};
        }""")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, server):
    p = Page(browser, server.url)
    yield p
    assert not p.errors, p.errors  # no uncaught exception in the page's script
    p.close()


def api_answer(server, messages: list[dict], max_tokens: int, method: str) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0, "speculative": {"method": method}})
    assert r.status_code == 200, r.text
    return r.json()


def test_page_and_its_files_are_served_and_load_nothing_from_another_host(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for name in ("chat.js", "chat.css", "favicon.svg"):
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and r.text == (STATIC / name).read_text()
    for path in STATIC.iterdir():  # an SVG names its namespace with a URL, which loads nothing
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|\b(src|href)=\"//", text), path.name
    assert "/" not in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_page_works_under_its_own_content_security_policy(browser, server):
    context = browser.new_context(base_url=server.url)
    try:
        tab = context.new_page()
        console: list[str] = []
        tab.on("console", lambda m: console.append(m.text))
        tab.goto("/")
        tab.wait_for_selector("#model option", state="attached", timeout=30_000)
        assert not [m for m in console if "Content Security Policy" in m], console
    finally:
        context.close()


def test_page_loads_without_errors_and_the_sidebar_fits(browser, server):
    """At 1280x800, under the page's own policy: no console error, no request that fails (the
    favicon included), and the sidebar's last paragraph on screen; in a shorter window the sidebar
    scrolls on its own to show it."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server.url)
    problems: list[str] = []
    try:
        tab = context.new_page()
        tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        tab.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        tab.on("requestfailed", lambda r: problems.append(f"failed {r.url}: {r.failure}"))
        tab.goto("/")
        tab.wait_for_selector("#model option", state="attached", timeout=30_000)
        tab.wait_for_load_state("networkidle")
        assert not problems, problems
        assert tab.evaluate("() => document.querySelector('link[rel=icon]').href").endswith("/static/favicon.svg")

        last_paragraph = """() => {
            const shown = [...document.querySelectorAll('#settings p')].filter(p => p.offsetParent !== null);
            const last = shown.at(-1), aside = document.querySelector('#settings');
            return {text: last.textContent, bottom: last.getBoundingClientRect().bottom, height: innerHeight,
                    scrollable: aside.scrollHeight > aside.clientHeight, page: document.documentElement.scrollHeight};
        }"""
        seen = tab.evaluate(last_paragraph)
        assert "hover" in seen["text"] and seen["bottom"] <= seen["height"] and seen["page"] <= seen["height"], seen
        tab.set_viewport_size({"width": 1280, "height": 600})
        seen = tab.evaluate(last_paragraph)
        assert seen["scrollable"] and seen["bottom"] > seen["height"], seen
        tab.evaluate("() => { const a = document.querySelector('#settings'); a.scrollTop = a.scrollHeight; }")
        seen = tab.evaluate(last_paragraph)
        assert seen["bottom"] <= seen["height"] and seen["page"] <= seen["height"], seen
        assert not problems, problems
    finally:
        context.close()


def test_two_turn_greedy_conversation_equals_the_api_and_shows_speculation(page, server):
    page.wait_for_models()
    page.configure("logitspec", "0", "48")
    turns = ["Name three rivers in Europe, one per line.", "Repeat that list, adding the country of each river."]
    messages: list[dict] = []
    for turn in turns:
        shown = page.ask(turn)
        messages.append({"role": "user", "content": turn})
        expected = api_answer(server, messages, 48, "logitspec")
        text = expected["choices"][0]["message"]["content"]
        assert shown["text"] == text
        messages.append({"role": "assistant", "content": text})

        stats = shown["stats"]
        tokens, steps, mat = int(stats["tokens"]), int(stats["steps"]), float(stats["mat"])
        assert tokens == expected["usage"]["completion_tokens"]
        assert int(stats["prompt"]) == expected["usage"]["prompt_tokens"]
        assert 1 <= steps <= tokens and mat >= 1.0
        assert mat == pytest.approx(tokens / steps, abs=0.01)
        assert float(stats["tps"]) > 0
        assert len(shown["steps"]) >= 1 and all(re.fullmatch(r"step k[1-5]( alt)?", c) for c in shown["steps"])
        live = page.tab.evaluate("() => Object.fromEntries([...document.querySelectorAll('[data-live]')]"
                                 ".map(e => [e.dataset.live, e.textContent]))")
        assert int(live["steps"]) == steps and int(live["tokens"]) == tokens

    # both requests of the conversation: streamed, the same session key, the history carried
    bodies = [r.post_data_json for r in page.sent]
    assert len(bodies) == 2
    assert all(b["stream"] is True and b["speculative"] == {"method": "logitspec"} for b in bodies)
    assert bodies[0]["prompt_cache_key"] and bodies[1]["prompt_cache_key"] == bodies[0]["prompt_cache_key"]
    assert bodies[1]["messages"] == messages[:3]
    assert bodies[0]["model"] == httpx.get(server.url + "/v1/models").json()["data"][0]["id"]

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.tab.screenshot(path=str(SCREENSHOT))

    # "New chat": an empty conversation under a new key
    page.tab.click("#new-chat")
    assert page.tab.locator(".msg").count() == 0
    page.configure("ar", "0", "4")
    page.ask("Hello")
    third = page.sent[-1].post_data_json
    assert third["prompt_cache_key"] != bodies[0]["prompt_cache_key"]
    assert third["messages"] == [{"role": "user", "content": "Hello"}] and third["speculative"] == {"method": "ar"}


def test_shift_enter_is_a_new_line_and_the_system_prompt_is_sent(page):
    page.wait_for_models()
    page.configure("pld", "0", "4")
    page.tab.fill("#system", "Answer in one word.")
    page.tab.fill("#input", "first line")
    page.tab.press("#input", "Shift+Enter")
    page.tab.type("#input", "second line")
    assert page.sent == [] and page.tab.input_value("#input") == "first line\nsecond line"
    page.tab.press("#input", "Enter")
    page.tab.wait_for_selector(".msg.assistant .stats", timeout=60_000)
    body = page.sent[0].post_data_json
    assert body["messages"] == [{"role": "system", "content": "Answer in one word."},
                                {"role": "user", "content": "first line\nsecond line"}]


def test_stop_ends_the_stream_and_the_server_frees_the_slot(page, server):
    page.wait_for_models()
    page.configure("logitspec", "0", "1500")
    page.tab.fill("#input", "Write a long story about a dragon who learns to sing.")
    page.tab.press("#input", "Enter")
    page.tab.wait_for_function("Number(document.querySelector('[data-live=steps]').textContent) >= 5",
                               timeout=60_000)
    assert server.health()["running"] == 1
    page.tab.click("#stop")
    page.tab.wait_for_selector(".msg.assistant .stats", timeout=10_000)
    answer = page.last_answer()
    assert "stopped" in page.tab.text_content(".msg.assistant .stats .status")
    assert answer["text"] and int(answer["stats"]["tokens"]) < 1500
    assert page.tab.is_visible("#send") and not page.tab.is_visible("#stop")
    h = server.wait_idle(30)
    assert h["running"] == 0 and h["kv_slots_used"] == 0


def sse(*events: str) -> str:
    return "".join(f"{e}\r\n\r\n" for e in events)


def chunk(content: str | None, k: int | None = None, finish: str | None = None, spec: dict | None = None) -> str:
    body = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {} if content is None else {"content": content}, "logprobs": None,
                         "finish_reason": finish}]}
    if k is not None:
        body["speculative"] = {"step_tokens": k}
    if spec is not None:
        body["speculative"] = spec
    return "data: " + json.dumps(body)


def test_model_output_is_shown_as_text_and_runs_nothing(page):
    """The model's text cannot be forced, so the stream is the server's shape with crafted content."""
    hostile = ["<script>window.__pwned = 1</script>", " and ", "<img src=x onerror=\"window.__pwned = 2\">",
               " <b>bold</b> &amp;"]
    body = sse(*(chunk(part, k) for part, k in zip(hostile, (3, 1, 5, 2))),
               chunk(None, finish="stop", spec={"steps": 4, "mean_accepted_tokens": 2.75}),
               'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 11, "total_tokens": 16}}',
               "data: [DONE]")
    page.tab.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=body))
    page.wait_for_models()
    answer = page.ask("say something nasty")
    assert answer["text"] == "".join(hostile)
    page.tab.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert page.tab.evaluate("() => window.__pwned") is None
    assert page.tab.locator("#transcript img, #transcript script, .msg .body b").count() == 0
    assert answer["stats"]["steps"] == "4" and answer["stats"]["mat"] == "2.75" and answer["stats"]["tokens"] == "11"
    assert [c.split()[1] for c in answer["steps"]] == ["k3", "k1", "k5", "k2"]


@pytest.mark.parametrize("status, body, words", [
    (400, {"error": {"message": "temperature: must be at most 2", "type": "invalid_request_error",
                     "param": "temperature", "code": "invalid_value"}},
     "The server did not accept the request: temperature: must be at most 2"),
    (429, {"error": {"message": "the server is at capacity", "type": "rate_limit_error", "param": None,
                     "code": "queue_full"}}, "The server is busy right now"),
    (200, sse('event: error\r\ndata: {"error": {"message": "generation failed: RuntimeError", "type": '
              '"server_error", "param": null, "code": "generation_failed"}}'),
     "The answer failed while it was being written: generation failed: RuntimeError"),
])
def test_api_errors_are_shown_in_plain_words(page, status, body, words):
    headers = {"content-type": "text/event-stream" if status == 200 else "application/json"}
    page.tab.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=status, headers=headers, body=body if isinstance(body, str) else json.dumps(body)))
    page.wait_for_models()
    answer = page.ask("hello")
    assert words in answer["error"]
    assert page.tab.is_visible("#send")


def test_with_api_keys_the_page_asks_for_a_key_and_keeps_it_in_local_storage(browser):
    keyed = ServerProcess("--max-context", "512", "--no-adaptive", "--api-key", KEY)  # no calibration: starts fast
    try:
        # the page itself stays open; the API does not
        assert httpx.get(keyed.url + "/").status_code == 200
        assert httpx.get(keyed.url + "/static/chat.js").status_code == 200
        assert httpx.get(keyed.url + "/v1/models").status_code == 401
        page = Page(browser, keyed.url)
        try:
            page.tab.wait_for_selector("#key-form", state="visible", timeout=10_000)
            assert "needs an API key" in page.tab.text_content(".notice")
            page.tab.fill("#api-key", KEY)
            page.tab.click("#key-form button")
            page.wait_for_models()
            assert page.tab.evaluate("() => localStorage.getItem('logitspec.apiKey')") == KEY
            page.configure("ar", "0", "3")
            answer = page.ask("Hi")
            assert answer["error"] is None and answer["text"]
            assert page.sent[-1].all_headers()["authorization"] == f"Bearer {KEY}"
            # a reload finds the key again: no question asked
            page.tab.reload()
            page.wait_for_models()
            assert page.tab.is_hidden("#key-form")
            assert not page.errors, page.errors
        finally:
            page.close()
    finally:
        keyed.stop()
