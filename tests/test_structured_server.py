"""Structured output and tool calls through a live server on the default model, with the official
openai client: parsed objects, a tool-call round trip, streamed tool_calls deltas, and 400s that
name the parameter."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from server_process import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-context", "2048", "--max-running", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client(timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


class Place(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    visitors_per_year: int = Field(ge=0, le=10**9)  # digits without end would need no end of tokens


PROMPTS = [f"Tell me about {p}." for p in (
    "Paris", "Tokyo", "the Grand Canyon", "Rome", "Machu Picchu", "New York", "the Eiffel Tower", "Sydney",
    "Cairo", "the Great Wall", "Berlin", "Venice", "Rio de Janeiro", "Kyoto", "London", "Yellowstone",
    "Barcelona", "Petra", "Istanbul", "Cape Town")]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


def test_parse_returns_a_pydantic_object_for_20_prompts(client, model):
    def parse(prompt):
        return client.chat.completions.parse(model=model, response_format=Place,
                                             messages=[{"role": "user", "content": prompt}],
                                             max_tokens=80, temperature=0)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(parse, PROMPTS))
    for prompt, r in zip(PROMPTS, results):
        place = r.choices[0].message.parsed
        assert isinstance(place, Place), (prompt, r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop"
    assert len({r.choices[0].message.content for r in results}) > 10  # the answers follow the prompts


def test_json_object_is_valid_json(client, model):
    r = client.chat.completions.create(model=model, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "A JSON object with your name."}],
                                       max_tokens=60, temperature=0.7, seed=3)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix the grammar allowed, an object's beginning
        assert r.choices[0].message.content.startswith("{")


def test_tool_call_round_trip(client, model):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=120, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], tool_choice="none",
                                            max_tokens=40, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_calls_reassemble_to_the_non_streamed_call(client, model, tool_choice):
    kw = dict(model=model, messages=[{"role": "user", "content": "Weather and time in Oslo, please."}],
              tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=120, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish, fragments = None, 0
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.id is not None:  # a call's first delta: its id, type and name
                    assert d.index not in calls and d.type == "function" and d.function.name
                    calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    calls[d.index]["arguments"] += d.function.arguments
                    fragments += 1
            assert not c.delta.content
            finish = c.finish_reason or finish
    expected = [{"name": t.function.name, "arguments": t.function.arguments} for t in whole.message.tool_calls]
    assert [calls[k] for k in sorted(calls)] == expected
    assert finish == whole.finish_reason == "tool_calls"
    assert fragments > 1  # the arguments were streamed as they were decided, not in one piece
    if isinstance(tool_choice, dict):
        assert all(c["name"] == "get_time" for c in expected)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                     "required": 5}}}},
     "response_format.json_schema.schema"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools[1].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice.function.name"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
])
def test_invalid_schemas_and_tools_are_400s_naming_the_parameter(server, client, model, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:  # the official client reads it as OpenAI's
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       **body)
    assert e.value.param == param
