"""Access control, limits, CORS, fault isolation and graceful shutdown.

The tiny random model serves the edge tests (they never look at what it writes); the fault tests
compare outputs token for token, on the tiny model at the engine and on the real model through HTTP.
"""

import asyncio
import gc
import json
import logging
import re
import signal
import time

import httpx
import pytest
import torch

from decoding.config import EngineConfig
from decoding.engine import Engine
from decoding.verify import SamplingParams
from live_app import LiveApp
from raw_http import KeepAlive
from server.app import create_app
from server.gate import APIKeys, key_namespace
from server.settings import ServerSettings, keys_from_env
from server_process import ServerProcess
from sse import aiter_sse, sse_events

KEY_A, KEY_B = "key-alpha-0001", "key-beta-0002"
ORIGIN = "https://chat.example.com"
SHAPE = {"message", "type", "param", "code"}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == SHAPE and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


# ---- configuration and keys (no model) ----------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"api_keys": ("short",)}, "at least 8 characters"),
    ({"api_keys": ("has space in it",)}, "without spaces"),
    ({"max_n": 0}, "max_n must be >= 1"),
    ({"max_body_bytes": 0}, "max_body_bytes must be >= 1"),
    ({"max_tokens_cap": 0}, "max_tokens_cap must be >= 1"),
    ({"max_prompt_tokens": -5}, "max_prompt_tokens must be >= 1"),
    ({"max_stop": -1}, "max_stop must be >= 0"),
    ({"shutdown_grace": -1}, "shutdown_grace must be >= 0"),
    ({"cors_origins": ("chat.example.com",)}, "CORS origin"),
])
def test_settings_refuse_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        ServerSettings(model_name="m", **kw)


def test_api_keys_match_only_the_exact_bearer_key():
    keys = APIKeys([KEY_A, KEY_B])
    assert keys.namespace(f"Bearer {KEY_A}") == key_namespace(KEY_A)
    assert keys.namespace(f"bearer {KEY_B}") == key_namespace(KEY_B)
    assert key_namespace(KEY_A) != key_namespace(KEY_B)
    for header in (None, "", "Bearer", "Bearer ", f"Basic {KEY_A}", f"Bearer {KEY_A}x", f"Bearer {KEY_A[:-1]}",
                   KEY_A):
        assert keys.namespace(header) is None, header
    assert not APIKeys([])
    assert keys_from_env({"LOGITSPEC_API_KEYS": f" {KEY_A},, {KEY_B} "}) == (KEY_A, KEY_B)


# ---- the HTTP edge, on the tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_engine(tiny_loaded):
    # Without cost-aware sizing and with room for every node (on this 97-token vocabulary the drafter
    # finds 80-120), a tree is everything the drafter found, so draft quality (steps) depends on the
    # session's index alone. Trees cut to a capacity keep the nodes that acceptance statistics from
    # all traffic rank first, and steps would then depend on what the module's other tests ran.
    return Engine(EngineConfig(method="logitspec", max_batch=4, max_context=640, tree_capacity=400, adaptive=False),
                  loaded=tiny_loaded)


@pytest.fixture(scope="module")
def edge(tiny_engine):
    settings = ServerSettings(model_name="tiny", api_keys=(KEY_A, KEY_B), cors_origins=(ORIGIN,),
                              max_body_bytes=4096, max_prompt_tokens=100, max_tokens_cap=8, max_n=2, max_stop=2,
                              max_stop_length=10, max_sessions=8)
    live = LiveApp(create_app(tiny_engine, settings))
    yield live
    live.stop()


def chat_body(content="hello there", **kw):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **kw}


@pytest.mark.parametrize("method, path", [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                                          ("GET", "/v1/models"), ("GET", "/v1/nothing-here"), ("GET", "/metrics")])
@pytest.mark.parametrize("headers", [{}, auth("key-wrong-0003"), {"Authorization": KEY_A},
                                     {"Authorization": f"Basic {KEY_A}"}])
def test_401_without_or_with_a_wrong_key(edge, method, path, headers):
    r = httpx.request(method, edge.url + path, json=chat_body(), headers=headers)
    assert_openai_error(r, 401, code="invalid_api_key")
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


def test_right_key_passes_and_open_routes_stay_open(edge):
    for key in (KEY_A, KEY_B):
        r = httpx.post(edge.url + "/v1/chat/completions", json=chat_body(), headers=auth(key))
        assert r.status_code == 200, r.text
        assert httpx.get(edge.url + "/metrics", headers=auth(key)).status_code == 200
    assert_openai_error(httpx.get(edge.url + "/v1/nothing-here", headers=auth(KEY_A)), 404)
    assert httpx.get(edge.url + "/health").json()["status"] == "ok"
    assert httpx.get(edge.url + "/openapi.json").status_code == 200
    for path in ("/", "/static/chat.js"):  # the chat page and its files are never behind a key
        assert httpx.get(edge.url + path).status_code != 401


def test_prefix_cache_blocks_are_not_shared_across_api_keys(edge, tiny_engine):
    """The same prompt sent again with the same key reuses its cached blocks; sent with another
    key it finds none (a hit's timing would tell one key what the other sent)."""
    cache = tiny_engine.cache
    body = chat_body("the same long prompt, sent by two different API keys ")

    def hits_of(key):
        before = cache.hit_tokens
        r = httpx.post(edge.url + "/v1/chat/completions", json=body, headers=auth(key))
        assert r.status_code == 200, r.text
        return cache.hit_tokens - before

    hits_of(KEY_A)
    assert hits_of(KEY_A) >= 3 * cache.block_size
    assert hits_of(KEY_B) == 0
    assert hits_of(KEY_B) >= 3 * cache.block_size


@pytest.mark.parametrize("body, status, param, code", [
    (chat_body(n=3), 400, "n", "too_many_choices"),
    ({"prompt": ["a", "b", "c"], "max_tokens": 2}, 400, "n", "too_many_choices"),
    (chat_body(stop=["a", "b", "c"]), 400, "stop", "too_many_stop_sequences"),
    (chat_body(stop="x" * 11), 400, "stop", "stop_sequence_too_long"),
    (chat_body(max_tokens=9), 400, "max_tokens", "max_tokens_exceeded"),
    (chat_body(max_completion_tokens=9), 400, "max_completion_tokens", "max_tokens_exceeded"),
    (chat_body("y" * 150), 400, "messages", "prompt_too_long"),
    ({"prompt": "y" * 150}, 400, "prompt", "prompt_too_long"),
    (chat_body("z" * 5000), 413, None, "request_too_large"),
])
def test_limits_answer_with_clear_errors(edge, body, status, param, code):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = httpx.post(edge.url + path, json=body, headers=auth(KEY_A))
    assert_openai_error(r, status, code=code, param=param)


GOOD = json.dumps(chat_body()).encode()


def raw_chat(content: bytes, **extra) -> bytes:
    """A chat body with `content` spliced in as it is: JSON escapes or raw bytes, valid or not."""
    rest = b"".join(b', "%s": %s' % (k.encode(), json.dumps(v).encode()) for k, v in extra.items())
    return b'{"messages": [{"role": "user", "content": "' + content + b'"}], "max_tokens": 2' + rest + b"}"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", raw_chat(rb"a\ud800b"), "messages.0.content"),  # a lone high surrogate, escaped
    ("/v1/chat/completions", raw_chat(rb"\udfff"), "messages.0.content"),  # a lone low one
    ("/v1/chat/completions", raw_chat(rb"\ude00\ud83d"), "messages.0.content"),  # a pair in the wrong order
    ("/v1/chat/completions", raw_chat(b"a\xffb"), "messages.0.content"),  # a byte that is never UTF-8
    ("/v1/chat/completions", raw_chat(b"\xe2\x82"), "messages.0.content"),  # a character cut short
    ("/v1/chat/completions", raw_chat(b"\xed\xa0\x80"), "messages.0.content"),  # a surrogate encoded (CESU-8)
    ("/v1/chat/completions", raw_chat(b"\xc0\xaf"), "messages.0.content"),  # an overlong "/"
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", raw_chat(b"ok", stop=["fine", "\ud800"]), "stop.1"),
    ("/v1/chat/completions", raw_chat(b"ok", user="\udcff"), "user"),
    ("/v1/chat/completions", raw_chat(b"ok", prompt_cache_key="k\ud800"), "prompt_cache_key"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "ok"}], "\\ud800": 1}', "\\ud800"),
    ("/v1/completions", b'{"prompt": ["fine", "\\ud83d"], "max_tokens": 2}', "prompt.1"),
    ("/v1/completions", b'{"prompt": "\xf0\x9f\x98", "max_tokens": 2}', "prompt"),
])
def test_text_that_is_not_unicode_is_a_400_naming_it_and_the_connection_goes_on(edge, path, body, param):
    with KeepAlive(edge.port, auth(KEY_A)) as http:
        assert_openai_error(http.post(path, body), 400, code="invalid_unicode", param=param)
        assert http.reusable
        good = http.post("/v1/chat/completions", GOOD)  # the same connection serves the next request
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]
        assert http.requests == 2


@pytest.mark.parametrize("body", [
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',  # Python's extensions, not JSON
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}',
    b'{"metadata": ' + b"[" * 2000 + b"]" * 2000 + b"}",  # nested deeper than the parser goes
])
def test_bodies_that_are_not_json_are_a_400(edge, body):
    with KeepAlive(edge.port, auth(KEY_A)) as http:
        assert_openai_error(http.post("/v1/chat/completions", body), 400, code="invalid_json", param=None)
        assert http.post("/v1/chat/completions", GOOD).status_code == 200


# OpenAI's bounds (vLLM's for the top_k extension): each refused with a 400 that names it.
@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", chat_body(max_tokens=0), "max_tokens"),
    ("/v1/chat/completions", chat_body(max_completion_tokens=0), "max_completion_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", chat_body(max_tokens=-1), "max_tokens"),
    ("/v1/chat/completions", chat_body(max_tokens=1.5), "max_tokens"),
    ("/v1/chat/completions", chat_body(temperature=2.01), "temperature"),
    ("/v1/chat/completions", chat_body(temperature=-0.1), "temperature"),
    ("/v1/chat/completions", chat_body(top_p=1.01), "top_p"),
    ("/v1/chat/completions", chat_body(top_p=-0.1), "top_p"),
    ("/v1/chat/completions", chat_body(n=0), "n"),
    ("/v1/chat/completions", chat_body(n=-1), "n"),
    ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", chat_body(seed=2**63), "seed"),
    ("/v1/chat/completions", chat_body(seed=-2**63 - 1), "seed"),
    ("/v1/chat/completions", chat_body(top_k=-2), "top_k"),
    ("/v1/chat/completions", chat_body(frequency_penalty=0.5), "frequency_penalty"),  # not implemented
    ("/v1/chat/completions", chat_body(presence_penalty=-2), "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "best_of": 2}, "best_of"),
])
def test_numbers_out_of_bounds_are_a_400_naming_them_and_the_connection_goes_on(edge, path, body, param):
    with KeepAlive(edge.port, auth(KEY_A)) as http:
        assert_openai_error(http.post(path, body), 400, param=param)
        assert http.post("/v1/chat/completions", GOOD).status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", chat_body(max_tokens=1)),
    ("/v1/chat/completions", chat_body(max_completion_tokens=1, temperature=2, top_p=1)),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": 5}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": 0}),
    ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=20)),
    ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=0)),
    ("/v1/chat/completions", chat_body(seed=2**63 - 1, temperature=1)),
    ("/v1/chat/completions", chat_body(seed=-2**63, temperature=1)),
    ("/v1/chat/completions", chat_body(top_k=-1, temperature=1)),
    ("/v1/chat/completions", chat_body(n=2, temperature=1)),
    ("/v1/chat/completions", chat_body(frequency_penalty=0, presence_penalty=0.0)),  # neutral: accepted
])
def test_numbers_at_their_bounds_are_accepted(edge, path, body):
    r = httpx.post(edge.url + path, json=body, headers=auth(KEY_A))
    assert r.status_code == 200, r.text


def test_top_p_0_keeps_the_top_token_only(edge):
    """OpenAI accepts top_p 0: whatever the temperature and seed, the greedy answer."""
    greedy = httpx.post(edge.url + "/v1/chat/completions", headers=auth(KEY_A), json=chat_body(max_tokens=8)).json()
    for seed in (1, 2, 3):
        r = httpx.post(edge.url + "/v1/chat/completions", headers=auth(KEY_A),
                       json=chat_body(max_tokens=8, temperature=2, top_p=0, seed=seed))
        assert r.json()["choices"] == greedy["choices"]


def test_an_unhandled_exception_is_a_500_and_the_connection_goes_on(edge, tiny_engine, monkeypatch):
    """The last resort, for a bug we do not know yet: here the chat template raises (as a real
    tokenizer does on text it cannot encode)."""
    def broken(messages):
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")

    monkeypatch.setattr(tiny_engine, "chat_prompt", broken)
    with KeepAlive(edge.port, auth(KEY_A)) as http:
        for _ in range(2):
            r = http.post("/v1/chat/completions", GOOD)
            assert_openai_error(r, 500, code="internal_error")
            assert r.json()["error"]["type"] == "server_error" and "TextEncodeInput" not in r.text
        assert http.post("/v1/completions", {"prompt": "still here", "max_tokens": 2}).status_code == 200


def test_an_exception_in_a_started_stream_ends_it_with_an_error_event(edge, monkeypatch):
    import server.app

    def broken(*args):
        raise RuntimeError("injected into the stream")

    monkeypatch.setattr(server.app, "_logprobs_chat", broken)  # runs in the stream, after its first chunk
    with KeepAlive(edge.port, auth(KEY_A)) as http:
        r = http.post("/v1/chat/completions", chat_body(max_tokens=4, stream=True, logprobs=True))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.text.splitlines()))
        assert json.loads(events[0][1])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        event, data = events[-1]
        assert event == "error" and json.loads(data)["error"]["code"] == "internal_error"
        assert http.post("/v1/chat/completions", GOOD).status_code == 200
    deadline = time.time() + 10
    while (h := httpx.get(edge.url + "/health").json())["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert h["running"] == h["kv_slots_used"] == 0


def test_one_access_log_line_per_request(edge, caplog):
    caplog.set_level(logging.INFO, logger="logitspec.access")
    with KeepAlive(edge.port, auth(KEY_A)) as http:
        port = http.sock.getsockname()[1]
        usage = [http.post("/v1/chat/completions", chat_body(max_tokens=3)).json()["usage"]]
        stream = http.post("/v1/completions", {"prompt": "abc", "max_tokens": 2, "stream": True,
                                               "stream_options": {"include_usage": True}})
        usage.append(json.loads(list(sse_events(stream.text.splitlines()))[-2][1])["usage"])
        http.post("/v1/chat/completions", chat_body(max_tokens=0))
    httpx.get(edge.url + "/v1/models")  # without a key

    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "logitspec.access"]

    deadline = time.time() + 10
    while not any('"GET /v1/models" 401' in line for line in lines()) or len(lines()) < 4:
        assert time.time() < deadline, lines()
        time.sleep(0.02)
    ours = [line for line in lines() if line.startswith(f"127.0.0.1:{port} ")]
    assert len(ours) == 3, lines()
    assert re.fullmatch(rf'127\.0\.0\.1:{port} "POST /v1/chat/completions" 200 \d+\.\d{{3}}s prompt_tokens='
                        rf'{usage[0]["prompt_tokens"]} completion_tokens={usage[0]["completion_tokens"]}', ours[0])
    assert re.fullmatch(rf'\S+ "POST /v1/completions" 200 \S+s stream prompt_tokens={usage[1]["prompt_tokens"]} '
                        rf'completion_tokens={usage[1]["completion_tokens"]}', ours[1])
    assert re.fullmatch(r'\S+ "POST /v1/chat/completions" 400 \S+s', ours[2])
    assert [line for line in lines() if re.fullmatch(r'\S+ "GET /v1/models" 401 \S+s', line)]


def test_access_log_off(tiny_loaded, caplog):
    caplog.set_level(logging.INFO, logger="logitspec.access")
    engine = Engine(EngineConfig(max_batch=2, max_context=128, adaptive=False), loaded=tiny_loaded)
    live = LiveApp(create_app(engine, ServerSettings(model_name="tiny", access_log=False)))
    try:
        assert httpx.post(live.url + "/v1/chat/completions", json=chat_body()).status_code == 200
        time.sleep(0.2)
    finally:
        live.stop()
    assert not [r for r in caplog.records if r.name == "logitspec.access"]


def test_body_limit_holds_without_content_length(edge):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"w" * 1000
        yield b'"}]}'

    r = httpx.post(edge.url + "/v1/chat/completions", content=chunks(),
                   headers={**auth(KEY_A), "content-type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")


def test_max_tokens_cap_is_the_default(edge):
    r = httpx.post(edge.url + "/v1/chat/completions", headers=auth(KEY_A), json={
        "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
    r = httpx.post(edge.url + "/v1/completions", headers=auth(KEY_A), json={"prompt": "hi"})  # default 16 > cap
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8


def test_cors_preflight_and_headers(edge):
    pre = httpx.options(edge.url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    # a refusal reaches the browser's page as a readable error, not an opaque CORS failure
    r = httpx.get(edge.url + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(edge.url + "/v1/models", headers={"Origin": "https://evil.example", **auth(KEY_A)})
    assert "access-control-allow-origin" not in other.headers


def test_sessions_are_namespaced_by_key(edge, tiny_engine):
    """One key's session is invisible to another key naming the same session: a separate index,
    and no draft-quality side channel (the other key's speculative stats do not change)."""
    registry = edge.app.state.sessions
    base = len(registry)
    prompt = "repeat after me: the quick brown fox"

    def ask(key, session):
        r = httpx.post(edge.url + "/v1/chat/completions", headers=auth(key),
                       json=chat_body(prompt, max_tokens=8, prompt_cache_key=session))
        assert r.status_code == 200, r.text
        return r.json()

    fresh_b = ask(KEY_B, "shared-fresh")  # B in a session nobody primed
    first_a = ask(KEY_A, "shared")
    again_a = ask(KEY_A, "shared")  # A drafts from its own session
    b = ask(KEY_B, "shared")  # B names A's session
    assert len(registry) == base + 3  # shared-fresh (B), shared (A), shared (B)
    assert first_a["choices"] == again_a["choices"] == b["choices"] == fresh_b["choices"]
    assert again_a["speculative"]["steps"] < first_a["speculative"]["steps"]  # the channel exists ...
    assert b["speculative"] == fresh_b["speculative"]  # ... and does not cross keys
    # the registry holds neither raw keys nor raw session names
    names = list(registry._sessions)
    assert not any(KEY_A in n or KEY_B in n or "shared" in n for n in names)
    sizes = sorted(len(ix) for ix in registry._sessions.values())[-3:]
    assert sizes[-1] == 2 * sizes[0]  # A's index has two turns, each of B's one


# ---- fault isolation in the engine (tiny model) --------------------------------------------------------

PROMPTS = [[2, 5, 9, 11, 4], [2, 7, 7, 7, 30, 31], [2, 40, 41, 42, 43, 44, 45]]


def run_batch(engine, prompts, max_new=12):
    seqs = [engine.start_sequence(p, SamplingParams(), max_new) for p in prompts]
    try:
        while not all(s.finished for s in seqs):
            live = [s for s in seqs if not s.finished]
            engine.step(live)
    finally:
        for s in seqs:
            engine.stop_sequence(s)
    return seqs


@pytest.fixture()
def fault_engine(tiny_loaded):
    engine = Engine(EngineConfig(method="logitspec", max_batch=4, max_context=256, adaptive=False,
                                 tree_capacity=8), loaded=tiny_loaded)
    engine.solo = [engine.generate(p, SamplingParams(), 12).output for p in PROMPTS]
    return engine


def test_exception_in_one_sequence_fails_it_alone(fault_engine):
    bad = PROMPTS[1]

    def hook(seq, rows):
        if seq.prompt == bad and len(seq.output) >= 3:
            raise RuntimeError("injected")

    fault_engine.fault_hook = hook
    seqs = run_batch(fault_engine, PROMPTS)
    assert seqs[1].error == "RuntimeError" and seqs[1].finish_reason == "error"
    assert len(seqs[1].output) >= 3
    assert [seqs[0].output, seqs[2].output] == [fault_engine.solo[0], fault_engine.solo[2]]
    assert fault_engine.cache.used_slots == 0


@pytest.mark.parametrize("value,where", [("nan", "row"), ("nan", "one"), ("inf", "one"), ("-inf", "one")])
def test_non_finite_logits_fail_one_sequence(fault_engine, value, where):
    """A whole row gone bad, or one value in it (the step checks every row at once by its
    extremes: a NaN or an infinity anywhere in a row must still fail that sequence alone)."""
    def hook(seq, rows):
        if seq.prompt == PROMPTS[0] and len(seq.output) >= 2:
            if where == "row":
                rows[:] = float(value)
            else:
                rows[:, 7] = float(value)

    fault_engine.fault_hook = hook
    seqs = run_batch(fault_engine, PROMPTS)
    assert seqs[0].error == "non-finite logits"
    assert [seqs[1].output, seqs[2].output] == fault_engine.solo[1:]


def test_out_of_memory_shrinks_batch_then_tree_and_loses_nothing(fault_engine):
    calls = {"oom": 0}

    def hook(seq, rows):
        # the first batched forward and every tree of more than 2 nodes "run out of memory"
        if calls["oom"] == 0 or len(rows) > 2:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("injected: CUDA out of memory")

    fault_engine.fault_hook = hook
    seqs = run_batch(fault_engine, PROMPTS)
    assert calls["oom"] >= 2
    assert fault_engine.batch_limit == 1 and fault_engine.tree_capacity <= 2
    assert [s.error for s in seqs] == [None] * 3
    assert [s.output for s in seqs] == fault_engine.solo


# ---- fault isolation through the server (real model) -----------------------------------------------------

@pytest.mark.slow
def test_fault_in_one_request_leaves_the_others_correct(real_loaded):
    threads = torch.get_num_threads()
    engine = Engine(EngineConfig(method="logitspec", max_batch=4, max_context=512, tree_capacity=16, threads=1),
                    loaded=real_loaded)
    live = LiveApp(create_app(engine, ServerSettings(model_name="m")))
    questions = ["Name three rivers.", "What is 2 + 2?", "Write a haiku about snow.", "List four fruits."]
    poisoned = {tuple(engine.chat_prompt([{"role": "user", "content": q}])): mode for q, mode in
                ((questions[1], "raise"), (questions[3], "inf"))}  # a stream raises; a non-stream goes inf

    def body(q, stream):
        return {"messages": [{"role": "user", "content": q}], "max_tokens": 24, "temperature": 0, "stream": stream}

    async def streamed(http, q):
        text, error, done = [], None, False
        async with http.stream("POST", "/v1/chat/completions", json=body(q, True)) as r:
            assert r.status_code == 200
            async for event, data in aiter_sse(r):
                if event == "error":
                    error = json.loads(data)
                elif data == "[DONE]":
                    done = True
                else:
                    text.append(json.loads(data)["choices"][0]["delta"].get("content") or "")
        return "".join(text), error, done

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=300) as http:
            alone = [(await http.post("/v1/chat/completions", json=body(q, False))).json()["choices"][0]["message"]
                     ["content"] for q in questions]

            def hook(seq, rows):
                mode = poisoned.get(tuple(seq.prompt))
                if mode and len(seq.output) >= 4:
                    if mode == "raise":
                        raise RuntimeError("injected")
                    rows[:] = float("inf")

            engine.fault_hook = hook
            together = await asyncio.gather(streamed(http, questions[0]), streamed(http, questions[1]),
                                            streamed(http, questions[2]),
                                            http.post("/v1/chat/completions", json=body(questions[3], False)))
            engine.fault_hook = None
            after = (await http.post("/v1/chat/completions", json=body(questions[1], False))).json()
            return alone, together, after

    try:
        alone, together, after = asyncio.run(main())
        gc.collect()  # cycles (an exception's traceback) are not leaks
        health = httpx.get(live.url + "/health").json()
    finally:
        live.stop()
        torch.set_num_threads(threads)
    (t0, e0, d0), (t1, e1, d1), (t2, e2, d2), r3 = together
    assert (t0, e0, d0) == (alone[0], None, True)
    assert (t2, e2, d2) == (alone[2], None, True)
    assert e1["error"]["code"] == "generation_failed" and set(e1["error"]) == SHAPE and not d1
    assert alone[1].startswith(t1)  # what it sent before the fault was right
    assert_openai_error(r3, 500, code="generation_failed")
    assert "non-finite" in r3.json()["error"]["message"]
    assert after["choices"][0]["message"]["content"] == alone[1]  # the server goes on
    assert health["running"] == health["kv_slots_used"] == health["request_sessions"] == 0


# ---- graceful shutdown (real process) ---------------------------------------------------------------------

def _stream_lines(url, max_tokens, lines_before, on_ready):
    """Stream one chat answer; after `lines_before` data lines call on_ready(); return all data lines."""
    out = []
    with httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            for item in sse_events(r.iter_lines()):
                out.append(item)
                if len(out) == lines_before:
                    on_ready()
    return out


@pytest.mark.slow
def test_sigterm_finishes_running_streams_refuses_new_work_and_exits():
    server = ServerProcess("--max-context", "512", "--max-running", "2", "--tree-capacity", "8", "--threads", "1",
                           "--shutdown-grace", "60")
    seen = {}

    def on_ready():
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # the listening socket stays open while the stream drains: new work gets a clear 503
        seen["new"] = httpx.post(server.url + "/v1/chat/completions", timeout=10, json=chat_body())
        seen["health"] = httpx.get(server.url + "/health", timeout=10)

    try:
        lines = _stream_lines(server.url, 60, 4, on_ready)
        assert lines[-1] == (None, "[DONE]")
        chunks = [json.loads(d) for e, d in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert_openai_error(seen["new"], 503, code="shutting_down")
        assert seen["health"].status_code == 503 and seen["health"].json()["status"] == "draining"
        assert server.proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):  # and then it is gone
            httpx.get(server.url + "/health", timeout=5)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def _stream_through_sigterm(tiny_loaded, caplog, step_seconds: float, grace: float, max_tokens: int):
    """One stream on an in-process server that gets SIGTERM once the stream is under way; returns
    the stream's lines and the server's log messages after it exited."""
    caplog.set_level(logging.INFO, logger="logitspec.server")
    engine = Engine(EngineConfig(max_batch=2, max_context=256), loaded=tiny_loaded)
    engine.fault_hook = lambda seq, rows: time.sleep(step_seconds)
    live = LiveApp(create_app(engine, ServerSettings(model_name="tiny")), grace=grace)
    try:
        lines = _stream_lines(live.url, max_tokens, 3, lambda: live.server.handle_exit(signal.SIGTERM, None))
        live.thread.join(15)
        assert not live.thread.is_alive()
    finally:
        live.stop()
    return lines, [r.getMessage() for r in caplog.records if r.name == "logitspec.server"]


def test_shutdown_grace_over_fails_the_rest_and_exits(tiny_loaded, caplog):
    # steps slow enough for the stream to outlast the grace
    lines, said = _stream_through_sigterm(tiny_loaded, caplog, step_seconds=0.05, grace=0.5, max_tokens=200)
    event, data = lines[-1]
    assert event == "error"
    assert json.loads(data)["error"] == {"message": "the server is shutting down", "type": "service_unavailable",
                                         "param": None, "code": "generation_failed"}
    assert said[0] == "shutting down: draining 1 requests (grace 0.5 s)"
    assert re.fullmatch(r"shutting down: drained 0 requests in 0\.\d s, failing 1 still running", said[2]), said
    assert said[-1] == "stopped"


def test_shutdown_logs_the_requests_it_drained(tiny_loaded, caplog):
    lines, said = _stream_through_sigterm(tiny_loaded, caplog, step_seconds=0.02, grace=30, max_tokens=30)
    assert lines[-1] == (None, "[DONE]")
    assert said[0] == "shutting down: draining 1 requests (grace 30.0 s)"
    assert re.fullmatch(r"shutting down: drained 1 requests in \d+\.\d s", said[1]), said
    assert said[-1] == "stopped"
