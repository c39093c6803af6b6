"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

Every operation gets requests generated from its documented body schema, both valid ones
(positive) and ones that break the schema (negative), against a live server on the tiny model with
API keys on and small caps so generated requests stay cheap. The server must never answer 5xx,
every error must have OpenAI's shape, and every stream must end with [DONE].
"""

import json
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from decoding.config import EngineConfig
from decoding.engine import Engine
from live_app import LiveApp
from server.app import create_app
from server.settings import ServerSettings

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


def problems(response) -> list[str]:
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
    if ctype[0].startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        if "event: error" in response.text or not data or data[-1] != "[DONE]":
            return [f"stream without [DONE] or with an error event: {response.text[-300:]}"]
        [json.loads(d) for d in data[:-1]]
    return []


def test_fuzz_the_openapi_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    sent: Counter = Counter()
    codes: Counter = Counter()
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
                             for p in problems(response))

            call()
    total = sum(sent.values())
    print(f"\nschemathesis: {total} generated requests")
    for key, n in sorted(sent.items()):
        print(f"  {' '.join(key)}: {n}")
    print("  error codes: " + ", ".join(f"{' '.join(map(str, k))}: {n}" for k, n in codes.most_common()))
    assert total >= 450
    assert sum(n for k, n in sent.items() if k[2] == "5xx") == 0, "\n".join(found)
    assert not found, "\n".join(found)
    health = fuzz_server.app.state.scheduler.counts
    assert health["running"] == health["kv_slots_used"] == 0
