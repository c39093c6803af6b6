"""Structured output and tool calling for chat requests: the grammar a request's `response_format`,
`tools` and `tool_choice` ask of the output, how tools reach the prompt, and how tool calls are
read back from the text, whole or as it streams.

Tool calls have one output format, whatever the chat template (the one Qwen2.5 and Hermes
templates ask for), with the arguments as compact JSON on one line:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Calls follow each other separated by a newline. The grammar makes that format, the function names
and each function's `parameters` schema binding, so the reader below never meets anything else.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from decoding.grammar import GrammarError, Grammars, json_schema_grammar, lark_grammar
from server.schemas import ChatCompletionRequest, ParamError

CALL_OPEN = '<tool_call>\n{"name": "'  # then the function's name
ARGUMENTS = '", "arguments": '  # then the arguments, a JSON object on one line
CALL_CLOSE = "}\n</tool_call>"
SEPARATOR = "\n"  # between two calls

TOOLS_PROMPT = """# Tools

You may call one or more of these functions:
<tools>
{tools}
</tools>

To call a function, answer with one block per call, and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>"""


# ---- grammars -------------------------------------------------------------------------------------

def _compact(schema: dict) -> dict:
    """A schema for Lark's %json with the layout of decoding.grammar.json_schema_grammar (compact,
    one line): the JSON compiler reads its options from "x-guidance"."""
    return {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def _schema_grammar(schema, param: str) -> str:
    try:
        return json_schema_grammar(schema)
    except Exception as e:  # llguidance refuses what it cannot compile with a ValueError or RuntimeError
        raise ParamError(f"{param}: invalid JSON schema: {e}", param, "invalid_schema") from None


def _check(grammars: Grammars, grammar: str, param: str) -> None:
    try:
        grammars.check(grammar)
    except GrammarError as e:
        raise ParamError(f"{param}: invalid JSON schema: {e}", param, "invalid_schema") from None


def output_grammar(req: ChatCompletionRequest, grammars: Grammars) -> str | None:
    """The grammar the answer must follow, None when free. ParamError names the schema at fault."""
    answer = None  # the grammar of a plain answer (no tool call)
    rf = req.response_format or {}
    if rf.get("type") == "json_object":
        answer = json_schema_grammar({"type": "object"})
        _check(grammars, answer, "response_format")
    elif rf.get("type") == "json_schema":
        param = "response_format.json_schema.schema"
        answer = _schema_grammar(rf["json_schema"].get("schema", {"type": "object"}), param)
        _check(grammars, answer, param)
    if not req.calls_tools:
        return answer
    rules, names = [], []
    for i, tool in enumerate(req.tools):
        function = tool["function"]
        param = f"tools[{i}].function.parameters"
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        _check(grammars, _schema_grammar(schema, param), param)
        if req.tool_choice_name not in (None, function["name"]):
            continue
        names.append(f"call_{i}")
        opening = json.dumps(CALL_OPEN + function["name"] + ARGUMENTS)
        rules.append(f"call_{i}: {opening} args_{i} {json.dumps(CALL_CLOSE)}\n"
                     f"args_{i}: %json {json.dumps(_compact(schema))}")
    calls = "call" if req.parallel_tool_calls is False else f"call ({json.dumps(SEPARATOR)} call)*"
    lines = [f"calls: {calls}", f"call: {' | '.join(names)}", *rules]
    if req.tool_choice_mode == "auto":
        # Either calls or an answer; an answer may not start with "<", so that the two never overlap.
        if rf.get("type") in ("json_object", "json_schema"):
            schema = {"type": "object"} if rf["type"] == "json_object" else rf["json_schema"].get("schema", {})
            lines += ["start: calls | answer", f"answer: %json {json.dumps(_compact(schema))}"]
        else:
            lines += ["start: calls | TEXT", r"TEXT: /([^<](?s:.)*)?/"]
    else:
        lines.insert(0, "start: calls")
    grammar = lark_grammar("\n".join(lines))
    _check(grammars, grammar, "tools")
    return grammar


# ---- the prompt -----------------------------------------------------------------------------------

def template_renders_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def _call_text(call: dict) -> str:
    arguments = call["function"].get("arguments") or "{}"
    try:
        arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        arguments = json.dumps(arguments)
    return CALL_OPEN + call["function"]["name"] + ARGUMENTS + arguments + CALL_CLOSE


def chat_turns(req: ChatCompletionRequest, native: bool) -> tuple[list[dict], list[dict] | None]:
    """The messages for the chat template, and the tools to give it (None: not the template's job).

    native: the template renders tools; it gets them, assistant tool calls and `tool` messages in
    Hugging Face's shape. Otherwise the generic format: the tools and the call format described
    in the system message, calls written out in assistant turns, and each tool result a user
    turn wrapped in <tool_response> (a template without tools may know no `tool` role)."""
    turns = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        if role == "assistant" and m.tool_calls:
            if native:
                turns.append({"role": "assistant", "content": text, "tool_calls": [
                    {"type": "function", "function": {"name": c["function"]["name"],
                                                      "arguments": _arguments(c)}} for c in m.tool_calls]})
                continue
            text = SEPARATOR.join(filter(None, [text] + [_call_text(c) for c in m.tool_calls]))
        elif role == "tool":
            if native:
                turns.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id})
                continue
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        turns.append({"role": role, "content": text})
    if not req.tools:  # (with tool_choice "none" the tools are still described: the history may use them)
        return turns, None
    if native:
        return turns, req.tools
    described = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in req.tools))
    if turns and turns[0]["role"] == "system":
        turns[0] = {**turns[0], "content": turns[0]["content"] + "\n\n" + described}
    else:
        turns.insert(0, {"role": "system", "content": described})
    return turns, None


def _arguments(call: dict):
    try:
        return json.loads(call["function"].get("arguments") or "{}")
    except ValueError:
        return call["function"].get("arguments")


# ---- reading calls back -------------------------------------------------------------------------------

@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def as_message(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Piece:
    """What a stretch of text turned out to be: answer text, a call's start (its name), or more of a
    call's arguments."""

    kind: str  # "content" | "call" | "arguments"
    text: str = ""
    call: int = -1  # the call's index


@dataclass
class ToolCallReader:
    """Splits the model's text, as it arrives, into answer text and tool calls. Text that may still
    become a call is held back until it is decided; a call's arguments go out as soon as they
    cannot be the closing of the call."""

    enabled: bool = True
    calls: list[ToolCall] = field(default_factory=list)
    _state: str = "start"  # start | content | name | arguments | between
    _held: str = ""

    def feed(self, text: str) -> list[Piece]:
        self._held += text
        out: list[Piece] = []
        while True:
            held = self._held
            if self._state == "content" or (self._state == "start" and not self.enabled):
                self._state = "content"
                if held:
                    out.append(Piece("content", held))
                self._held = ""
                return out
            if self._state in ("start", "between"):
                opening = CALL_OPEN if self._state == "start" else SEPARATOR + CALL_OPEN
                if held.startswith(opening):
                    self._held, self._state = held[len(opening):], "name"
                    continue
                if opening.startswith(held):
                    return out  # still undecided
                self._state = "content"  # not a call (the grammar allows no text after calls)
                continue
            if self._state == "name":
                end = held.find(ARGUMENTS)
                if end < 0:
                    return out
                self.calls.append(ToolCall("call_" + uuid.uuid4().hex[:24], held[:end]))
                out.append(Piece("call", held[:end], len(self.calls) - 1))
                self._held, self._state = held[end + len(ARGUMENTS):], "arguments"
                continue
            # arguments: everything up to the closing; hold back what may be its beginning
            end = held.find(CALL_CLOSE)
            if end >= 0:
                emit, self._held, self._state = held[:end], held[end + len(CALL_CLOSE):], "between"
            else:
                keep = next((k for k in range(min(len(held), len(CALL_CLOSE) - 1), 0, -1)
                             if CALL_CLOSE.startswith(held[-k:])), 0)
                emit, self._held = held[:len(held) - keep], held[len(held) - keep:]
            if emit:
                self.calls[-1].arguments += emit
                out.append(Piece("arguments", emit, len(self.calls) - 1))
            if end < 0:
                return out

    def finish(self) -> list[Piece]:
        """The end of the text: what was held back goes out as what it was (a call cut short by
        max_tokens keeps its partial arguments, as OpenAI's do)."""
        held, self._held = self._held, ""
        if not held:
            return []
        if self._state == "arguments":
            self.calls[-1].arguments += held
            return [Piece("arguments", held, len(self.calls) - 1)]
        if self._state in ("start", "content"):
            return [Piece("content", held)]
        return []


def read_all(text: str, enabled: bool) -> tuple[str, list[ToolCall]]:
    """A whole answer: its text (without the calls) and its tool calls."""
    reader = ToolCallReader(enabled)
    pieces = reader.feed(text) + reader.finish()
    return "".join(p.text for p in pieces if p.kind == "content"), reader.calls
