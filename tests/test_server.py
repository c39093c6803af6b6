"""A live server (real default model, uvicorn on a free localhost port) driven by the official
openai client, and by raw httpx for what a client library would not send."""

import asyncio
import json
import re

import httpx
import pytest

from server_process import ROOT, ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-context", "2048", "--max-running", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client(timeout=120)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(real_loaded):
    return real_loaded.tokenizer


def chat(client, model, content, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(server, model_name):
    assert model_name.startswith("SmolLM2")
    assert server.health()["status"] == "ok"


def test_chat_greedy_stream_equals_non_stream_and_usage_counts(client, model_name, tokenizer):
    msg = "List three colours."
    full = chat(client, model_name, msg, max_tokens=24, temperature=0)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert full.choices[0].finish_reason in ("length", "stop")
    text = full.choices[0].message.content
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                               tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    assert full.usage.prompt_tokens == len(prompt_ids)
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 24
    assert full.usage.completion_tokens == len(tokenizer.encode(text))
    assert full.speculative["steps"] <= full.usage.completion_tokens

    chunks = list(chat(client, model_name, msg, max_tokens=24, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_n2_logprobs(client, model_name):
    r = client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=8,
                                  temperature=1.0, seed=5, n=2, logprobs=2)
    assert r.object == "text_completion" and len(r.choices) == 2
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(lp.tokens) > 0
        assert all(x <= 0 for x in lp.token_logprobs)
        assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)


def test_chat_logprobs(client, model_name):
    r = chat(client, model_name, "Hi", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    # greedy: each chosen token is the most likely one
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5)


def test_seeded_sampling_reproducible(client, model_name):
    kw = dict(max_tokens=20, temperature=0.9, seed=1234)
    a = chat(client, model_name, "Invent a name for a cat.", **kw).choices[0].message.content
    b = chat(client, model_name, "Invent a name for a cat.", **kw).choices[0].message.content
    assert a == b
    # and whatever the speculation method: the seed fixes the text
    c = chat(client, model_name, "Invent a name for a cat.", extra_body={"speculative": {"enabled": False}},
             **kw).choices[0].message.content
    assert c == a


def test_stop_strings(client, model_name):
    base = chat(client, model_name, "Count from one to twenty in words.", max_tokens=40, temperature=0)
    text = base.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 4]
    assert stop.strip()
    cut = text[:text.find(stop)]
    r = chat(client, model_name, "Count from one to twenty in words.", max_tokens=40, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(
        client, model_name, "Count from one to twenty in words.", max_tokens=40, temperature=0, stop=stop, stream=True)
        if c.choices)
    assert streamed == cut


def test_batch_invariance_8_concurrent_greedy(server, model_name):
    prompts = [("Write a haiku about rain.", 40), ("What is 12 times 7?", 24), ("Name the planets.", 60),
               ("Translate 'good morning' into German.", 16), ("Write a Python function to reverse a list.", 64),
               ("Summarize: the cat sat on the mat and slept all day.", 32), ("Give me a recipe title.", 12),
               ("Explain gravity in one sentence.", 48)]

    async def one(http, content, n):
        r = await http.post("/v1/chat/completions", json={
            "model": model_name, "messages": [{"role": "user", "content": content}], "max_tokens": n,
            "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            alone = [await one(http, c, n) for c, n in prompts]
            together = await asyncio.gather(*(one(http, c, n) for c, n in prompts))
            return alone, together

    alone, together = asyncio.run(main())
    assert together == alone


def test_disconnect_frees_slot(server, model_name):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": model_name, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": 1500, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            lines, h = [], None
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                if len(lines) == 5:
                    # Asked inside the loop: leaving it closes the line iterator, which closes the
                    # connection, and the server may free the slot before a later question arrives.
                    h = server.health()
                    break
            assert len(lines) == 5 and "[DONE]" not in lines[-1], lines
            assert h["running"] == 1 and h["kv_slots_used"] >= 1, h
    h = server.wait_idle(30)
    assert h["running"] == 0 and h["kv_slots_used"] == 0


def test_sessions_keyed_and_kept(server, client, model_name):
    before = server.health()["sessions"]
    chat(client, model_name, "Hello", max_tokens=4, temperature=0, extra_body={"prompt_cache_key": "sess-a"})
    chat(client, model_name, "Hello", max_tokens=4, temperature=0, user="user-b")
    chat(client, model_name, "Hello", max_tokens=4, temperature=0, extra_headers={"X-Session-ID": "sess-c"})
    chat(client, model_name, "Hello", max_tokens=4, temperature=0, extra_body={"prompt_cache_key": "sess-a"})
    chat(client, model_name, "Hello", max_tokens=4, temperature=0)  # no key: request-scoped index
    assert server.health()["sessions"] == before + 3


def prefix_hits(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("logitspec_prefix_cache_hits_total "):
            return float(line.split()[1])
    raise AssertionError("no prefix-cache hit counter")


def test_a_second_turn_reuses_the_first_turns_kv(server, client, model_name, tokenizer):
    """A chat front-end sends the whole conversation again: the second turn finds the first turn's
    prompt and answer in the prefix cache (whole blocks)."""
    history = [{"role": "user", "content": "List the planets of the solar system, one per line, with one fact each."}]
    first = client.chat.completions.create(model=model_name, messages=history, max_tokens=64, temperature=0,
                                           extra_body={"prompt_cache_key": "turns"})
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Repeat the list, without the facts."}]
    before = prefix_hits(server)
    second = client.chat.completions.create(model=model_name, messages=history, max_tokens=32, temperature=0,
                                            extra_body={"prompt_cache_key": "turns"})
    reused = prefix_hits(server) - before
    assert reused >= (first.usage.prompt_tokens + first.usage.completion_tokens) // 16 * 16 - 16
    assert reused < second.usage.prompt_tokens


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 3}).encode(), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 0}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}).encode(), 400,
     "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}).encode(), 400,
     "tools[0].function"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5}).encode(), 400,
     "frequency_penalty"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "response_format": {"type": "xml"}}).encode(), 400, "response_format.type"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "bogus": 1}).encode(), 400, "bogus"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "speculative": {"method": "eagle"}}).encode(), 400,
     "speculative.method"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}).encode(), 404, "model"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 99999}).encode(), 400, "max_tokens"),
])
def test_errors_in_openai_shape(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param


def test_completions_errors(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_queue_full_429_with_retry_after():
    small = ServerProcess("--max-context", "1024", "--max-running", "1", "--max-queue", "1")
    try:
        async def main():
            # 900 tokens: ~3 s even where speculation runs at ~300 tok/s (200 tokens took 0.8 s, and
            # fixed sleeps of 1.0 + 0.5 s let the first answer end before the third was sent)
            body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 900,
                    "temperature": 0}

            async def until(**counts):  # the scheduler's counts (/health) reach these
                while True:
                    health = (await http.get("/health")).json()
                    if all(health[k] == v for k, v in counts.items()):
                        return
                    await asyncio.sleep(0.02)

            async with httpx.AsyncClient(base_url=small.url, timeout=300) as http:
                first = asyncio.create_task(http.post("/v1/chat/completions", json=body))
                await asyncio.wait_for(until(running=1), 60)
                second = asyncio.create_task(http.post("/v1/chat/completions", json=body))
                await asyncio.wait_for(until(running=1, waiting=1), 60)
                third = await http.post("/v1/chat/completions", json=body)
                return third, await first, await second

        third, first, second = asyncio.run(main())
        assert third.status_code == 429
        assert third.headers["retry-after"] == "1"
        assert third.json()["error"]["type"] == "rate_limit_error"
        assert first.status_code == 200 and second.status_code == 200
        assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]
    finally:
        small.stop()


def test_readme_openai_example_prints_the_text_then_the_usage(server, client, model_name, capsys):
    """The README's `openai` streaming example, run as written against this server."""
    readme = (ROOT / "README.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "from openai" in block)
    assert "http://127.0.0.1:8000/v1" in example
    exec(compile(example.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.endswith("\n")
    text, _, usage = printed[:-1].rpartition("\n")
    full = chat(client, model_name, "Name three rivers.", max_tokens=64, temperature=0)
    assert text == full.choices[0].message.content
    assert usage == str({"completion_tokens": full.usage.completion_tokens, "prompt_tokens": full.usage.prompt_tokens,
                         "total_tokens": full.usage.total_tokens})
    assert "None" not in printed
