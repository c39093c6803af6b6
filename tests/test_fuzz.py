"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

Every operation gets requests generated from its documented body schema, both valid ones
(positive) and ones that break the schema (negative), against a live server on the tiny model with
API keys on and small caps so generated requests stay cheap. The server must never answer 5xx,
every error must have OpenAI's shape, every successful body (and every chunk of a stream) must
parse as the `openai` package's own type for it, and every stream must end with [DONE]. Unicode
edge cases that a generator rarely hits (lone surrogates, NUL, combining marks, right-to-left
text, 4-byte characters) are sent on purpose, and the detokenizer is fuzzed with characters split
across stream steps.
"""

import json
from collections import Counter
from typing import Literal

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from openai.types import Completion, CompletionChoice, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from decoding.config import EngineConfig
from decoding.engine import Engine
from live_app import LiveApp
from raw_http import KeepAlive
from server.app import create_app
from server.detokenizer import IncrementalDetokenizer
from server.settings import ServerSettings
from sse import sse_events

KEY = "fuzz-key-0001"
EXAMPLES = 120  # per operation and generation mode (hypothesis stops early when it runs out of cases)


@pytest.fixture(scope="module")
def fuzz_server(tiny_loaded):
    engine = Engine(EngineConfig(max_batch=4, max_context=256), loaded=tiny_loaded)
    live = LiveApp(create_app(engine, ServerSettings(
        model_name="tiny", api_keys=(KEY,), max_tokens_cap=8, max_n=2, max_prompt_tokens=128,
        max_body_bytes=32768, request_timeout=60)))
    yield live
    live.stop()


class CompletionChunkChoice(CompletionChoice):
    # openai's Completion is also its type for stream chunks, but makes finish_reason required;
    # OpenAI's own streams send null until a choice ends, as ours do
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class CompletionChunk(Completion):
    choices: list[CompletionChunkChoice]


# What the official client parses each successful body into: a body it cannot parse is a bug here.
BODY_TYPES = {"/v1/chat/completions": (ChatCompletion, ChatCompletionChunk),
              "/v1/completions": (Completion, CompletionChunk)}


def body_problems(path: str, body: dict, chunk: bool = False) -> list[str]:
    """Problems of one successful body (or stream chunk) of `path`: the openai type's validation,
    and what a type cannot say (usage adds up, choices are numbered in order)."""
    if path == "/v1/models":
        if body.get("object") != "list" or not body.get("data"):
            return [f"not a list of models: {body}"]
        [Model.model_validate(m) for m in body["data"]]
        return []
    if path not in BODY_TYPES:
        return []
    try:
        parsed = BODY_TYPES[path][chunk].model_validate(body)
    except ValueError as e:  # pydantic's ValidationError
        return [f"{'chunk' if chunk else 'body'} is no {BODY_TYPES[path][chunk].__name__}: {e}"]
    found = []
    if parsed.usage is not None and parsed.usage.total_tokens != parsed.usage.prompt_tokens + parsed.usage.completion_tokens:
        found.append(f"usage does not add up: {parsed.usage}")
    if not chunk and [c.index for c in parsed.choices] != list(range(len(parsed.choices))):
        found.append(f"choices out of order: {[c.index for c in parsed.choices]}")
    return found


def problems(response, path: str, checked: Counter) -> list[str]:
    status = response.status_code
    if status >= 500:
        return [f"{status}: {response.text[:300]}"]
    if status >= 400:
        try:
            err = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return [f"{status} not in OpenAI's error shape: {response.text[:300]}"]
        if set(err) != {"message", "type", "param", "code"} or not err["message"] or not isinstance(err["type"], str):
            return [f"{status} with a malformed error object: {err}"]
        return []
    ctype = response.headers.get("content-type") or [""]  # schemathesis: header -> list of values
    if isinstance(ctype, str):
        ctype = [ctype]
    if ctype[0].startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        if "event: error" in response.text or not data or data[-1] != "[DONE]":
            return [f"stream without [DONE] or with an error event: {response.text[-300:]}"]
        found = [p for d in data[:-1] for p in body_problems(path, json.loads(d), chunk=True)]
        checked["stream"] += 1
        checked["chunks"] += len(data) - 1
        return found
    if ctype[0].startswith("application/json"):
        checked["json"] += path in BODY_TYPES or path == "/v1/models"
        return body_problems(path, response.json())
    return []


def test_fuzz_the_openapi_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    sent: Counter = Counter()
    codes: Counter = Counter()
    checked: Counter = Counter()  # successful bodies validated: json, stream (and its chunks)
    found: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def call(case):
                response = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60)
                sent[operation.label, mode.value, f"{response.status_code // 100}xx"] += 1
                if response.status_code >= 400:
                    codes[operation.label, mode.value, response.json()["error"]["code"]] += 1
                found.extend(f"{operation.label} [{mode.value}] {p}\n    {case.as_curl_command()}"
                             for p in problems(response, operation.path, checked))

            call()
    total = sum(sent.values())
    print(f"\nschemathesis: {total} generated requests")
    for key, n in sorted(sent.items()):
        print(f"  {' '.join(key)}: {n}")
    print("  error codes: " + ", ".join(f"{' '.join(map(str, k))}: {n}" for k, n in codes.most_common()))
    print(f"  successful bodies checked against the openai types: {checked['json']} JSON, {checked['stream']} "
          f"streams ({checked['chunks']} chunks)")
    assert total >= 450
    # few generated bodies ask for a stream; the Unicode cases below check 64 more, chunk by chunk
    assert checked["json"] >= 100 and checked["stream"] >= 1, checked
    assert sum(n for k, n in sent.items() if k[2] == "5xx") == 0, "\n".join(found)
    assert not found, "\n".join(found)
    health = fuzz_server.app.state.scheduler.counts
    assert health["running"] == health["kv_slots_used"] == 0


# ---- Unicode edge cases, on purpose ---------------------------------------------------------------------

VALID_TEXT = {
    "nul": "a\x00b",
    "combining marks": "e\u0301 a\u0308\u0323 \u0915\u094d\u0937",
    "right-to-left": "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \u202eabc\u202c",
    "4-byte characters": "\U0001f600\U0001f389 \U00010348 \U0001d11e",
    "emoji sequence": "\U0001f469\u200d\U0001f4bb \U0001f1fa\U0001f1f8 \U0001f44d\U0001f3fd",
    "line separators": "one\u2028two\u2029three\r\nfour",
    "noncharacters and bom": "\ufeff\uffff\ufffe\U0010ffff",
    "replacement character": "\ufffd",
}
INVALID_TEXT = {"lone high surrogate": "\ud800", "lone low surrogate": "x\udfff", "reversed pair": "\ude00\ud83d"}


def bodies_with(text: str) -> list[tuple[str, dict, str]]:
    """(path, body, param) with `text` in every text field of both endpoints."""
    return [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "text", "text": text}]}]}, "messages.1.content.1.text"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": text}]}, "messages.0.name"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["zz", text]}, "stop.1"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "user": text}, "user"),
        ("/v1/completions", {"prompt": ["hi", text]}, "prompt.1"),
        ("/v1/completions", {"prompt": "hi", "stop": text}, "stop"),
        ("/v1/completions", {"prompt": "hi", "prompt_cache_key": text}, "prompt_cache_key"),
    ]


@pytest.mark.parametrize("name", list(VALID_TEXT))
def test_unicode_edge_cases_are_answered_and_streams_equal_the_answer(fuzz_server, name):
    """Valid but unusual text in every text field: a 200 whose body the openai types parse, and for
    greedy decoding the concatenated stream equals the non-streamed answer."""
    with KeepAlive(fuzz_server.port, {"Authorization": f"Bearer {KEY}"}) as http:
        for path, body, _ in bodies_with(VALID_TEXT[name]):
            body = {**body, "max_tokens": 6, "temperature": 0}
            full = http.post(path, body)
            assert full.status_code == 200, (path, body, full.text)
            assert not body_problems(path, full.json())
            stream = http.post(path, {**body, "stream": True})
            assert stream.status_code == 200 and not problems(stream, path, Counter())
            chunks = [json.loads(d) for e, d in sse_events(stream.text.splitlines()) if d != "[DONE]"]
            for i, choice in enumerate(full.json()["choices"]):
                parts = [c["choices"][0]["delta"].get("content") or "" if path.endswith("chat/completions")
                         else c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
                assert "".join(parts) == (choice["message"]["content"] if "message" in choice else choice["text"])


@pytest.mark.parametrize("name", list(INVALID_TEXT))
def test_text_that_is_not_unicode_is_refused_in_every_field(fuzz_server, name):
    with KeepAlive(fuzz_server.port, {"Authorization": f"Bearer {KEY}"}) as http:
        for path, body, param in bodies_with(INVALID_TEXT[name]):
            r = http.post(path, {**body, "max_tokens": 2})  # json.dumps escapes the surrogate: "\\ud800"
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)
            assert r.json()["error"]["code"] == "invalid_unicode"
        assert http.post("/v1/completions", {"prompt": "still here", "max_tokens": 2}).status_code == 200


class ByteTokenizer:
    """Byte-level, like GPT-2's: one token per UTF-8 byte, so a character of 2-4 bytes always
    spans tokens, and a prefix of a character decodes to U+FFFD."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


UNUSUAL = st.sampled_from(["\x00", "e\u0301", "\u05e9", "\u202e", "\U0001f600", "\U0001f469\u200d\U0001f4bb", "\u2028",
                           "\ufeff", "\U0010ffff", "\ufffd", "\u65e5\u672c", " ", "ab"])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(pieces=st.lists(st.one_of(st.text(min_size=1, max_size=3), UNUSUAL), min_size=1, max_size=12),
       steps=st.lists(st.integers(1, 6), min_size=1, max_size=40),
       stop=st.one_of(st.none(), st.sampled_from(["\U0001f600", "e\u0301", "\u05e9\u05dc", "zz"])))
def test_stream_steps_never_split_a_character(pieces, steps, stop):
    """Whatever the steps (the tokens each decoding step accepts) cut the bytes into, every delta is
    whole characters (no U+FFFD the text does not have, nothing that cannot be sent) and the deltas
    add up to the text, up to a stop string."""
    text = "".join(pieces)
    ids = ByteTokenizer().encode(text)
    detok = IncrementalDetokenizer(ByteTokenizer(), [stop] if stop else [])
    deltas, at, i = [], 0, 0
    while at < len(ids):
        k = steps[i % len(steps)]
        deltas.append(detok.push(ids[at:at + k]))
        at, i = at + k, i + 1
    deltas.append(detok.flush())
    expected = text[:text.find(stop)] if stop and stop in text else text
    assert "".join(deltas) == expected
    for delta in deltas:
        delta.encode("utf-8")  # no lone surrogate
        assert delta.count("\ufffd") <= expected.count("\ufffd")
