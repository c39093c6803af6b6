"""server/structured.py without a model: reading tool calls back (whole and in any split), the
prompt's turns, and what the request schema refuses, naming the parameter."""

import json

import pytest

from server.schemas import ChatCompletionRequest, ParamError
from server.structured import ToolCallReader, chat_turns, read_all

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>'
TWO = CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("text, enabled, content, calls", [
    ("Hello <b>there</b>", True, "Hello <b>there</b>", []),
    ("<b>bold</b>", True, "<b>bold</b>", []),
    (CALL, True, "", [("get_weather", '{"city": "Paris", "days": [1, 2]}')]),
    (TWO, True, "", [("get_weather", '{"city": "Paris", "days": [1, 2]}'), ("get_time", "{}")]),
    (CALL, False, CALL, []),  # tool_choice none: the text is the answer
    ('<tool_call>\n{"name": "f", "arguments": {"a": "}\\n</tool_call>"}}\n</tool_call>', True, "",
     [("f", '{"a": "}\\n</tool_call>"}')]),  # an escaped newline inside a string is no closing
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1', True, "", [("f", '{"a": 1')]),  # cut by max_tokens
    ("<tool_", True, "<tool_", []),
])
def test_reader_in_every_split(text, enabled, content, calls):
    whole = read_all(text, enabled)
    assert (whole[0], [(c.name, c.arguments) for c in whole[1]]) == (content, calls)
    for size in (1, 2, 3, 7):  # streamed in pieces of `size` characters, as tokens arrive
        reader = ToolCallReader(enabled)
        pieces = [p for i in range(0, len(text), size) for p in reader.feed(text[i:i + size])] + reader.finish()
        assert "".join(p.text for p in pieces if p.kind == "content") == content
        names = [p.text for p in pieces if p.kind == "call"]
        args = ["".join(p.text for p in pieces if p.kind == "arguments" and p.call == k) for k in range(len(names))]
        assert list(zip(names, args)) == calls
        if size == 1 and calls:  # arguments go out as they arrive, not when the call is complete
            assert sum(p.kind == "arguments" for p in pieces) > len(calls)
        # a call's name goes out before its arguments, and arguments never carry the closing
        for k in range(len(names)):
            first = next(j for j, p in enumerate(pieces) if p.call == k)
            assert pieces[first].kind == "call"
        assert all("</tool_call>" not in p.text for p in pieces if p.kind == "arguments") or "\\n" in text


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def request(**kw):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Weather in Paris?"}], **kw})


def test_generic_turns_describe_tools_and_render_calls_and_results():
    req = request(tools=TOOLS, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    turns, tools = chat_turns(req, native=False)
    assert tools is None
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in turns[0]["content"] and "<tool_call>" in turns[0]["content"]
    assert turns[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert turns[3]["content"] == "<tool_response>\nsunny, 21 C\n</tool_response>"
    native, tools = chat_turns(req, native=True)
    assert tools == TOOLS and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"}


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS + TOOLS}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice.function.name"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
])
def test_invalid_structure_names_the_parameter(body, param):
    with pytest.raises(ValueError) as e:
        request(**body)
    cause = e.value.errors()[0]["ctx"]["error"]
    assert isinstance(cause, ParamError) and cause.param == param, (cause, param)


def test_valid_requests_and_tool_choice_modes():
    assert request().tool_choice_mode == "none"
    assert request(tools=TOOLS).tool_choice_mode == "auto"
    assert request(tools=TOOLS, tool_choice="required").calls_tools
    named = request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tool_choice_mode == "required" and named.tool_choice_name == "get_weather"
    assert not request(tools=TOOLS, tool_choice="none").calls_tools
    request(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"},
                                                                    "strict": True}})
    json.dumps(TOOLS)
