"""Request schemas (pydantic) for the OpenAI-compatible endpoints, and their validation rules.

Unknown parameters and OpenAI parameters we do not implement are refused with a 400 that names
the parameter: a client must never believe a setting took effect when it did not.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METHODS = ("ar", "pld", "logitspec")

# OpenAI parameters that would change the output but are not implemented: refused unless they
# carry their neutral value.
UNSUPPORTED_UNLESS_NEUTRAL: dict[str, Any] = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "functions": [],
    "function_call": "none",
    "best_of": 1,
    "echo": False,
    "suffix": None,
    "audio": None,
    "prediction": None,
    "web_search_options": None,
    "reasoning_effort": None,
}
# Accepted and without effect on the output (bookkeeping fields).
IGNORED = {"metadata", "store", "service_tier", "safety_identifier", "verbosity"}


class ParamError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def invalid_text_at(value: Any) -> tuple | None:
    """The path to the first string (a value or a key) in parsed JSON that is not valid Unicode, else None.

    JSON may escape a lone UTF-16 surrogate ("\\ud800"), and a body's bytes that are not UTF-8 are
    decoded into lone surrogates too (server.app decodes with "surrogateescape"). Such a string has
    no UTF-8 form: tokenizers refuse it and a response could not carry it back. A loop, not
    recursion: a body may nest as deep as the JSON parser allowed.
    """
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return path
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                stack.append((path + (key,), child))
                stack.append((path + (key,), key))
        elif isinstance(item, list):
            stack.extend((path + (i,), child) for i, child in reversed(list(enumerate(item))))
    return None


def printable(text: str) -> str:
    """Text that echoes a client's input (a parameter's name, a bad value) may not be valid Unicode:
    escape what has no UTF-8 form, so it can be sent back."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def param_name(path: tuple) -> str:
    """A JSON path as OpenAI-style `param` ("messages.0.content"), printable even when a key is not
    valid Unicode."""
    return ".".join(printable(str(p)) for p in path)


# The shapes of a tool and of an assistant's call, as the OpenAPI schema documents them (the request
# schema keeps them as dicts and checks them itself, naming the parameter).
TOOL_DOC = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "description": {"type": "string"},
        "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}}}
TOOL_CALL_DOC = {"type": "object", "required": ["type", "function"], "properties": {
    "id": {"type": "string"}, "type": {"enum": ["function"]},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string"}}}}}


class Speculative(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["ar", "pld", "logitspec"] | None = None
    enabled: bool = True


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    # OpenAI's bounds; how many tokens and choices at most: the server's limits
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)  # 0: the top token only
    top_k: int = Field(default=0, ge=-1)  # extension, as vLLM: 0 or -1 = off
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    stop: str | list[str] | None = None  # how many and how long: the server's limits
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    speculative: Speculative | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data):
        if (path := invalid_text_at(data)) is not None:
            param = param_name(path)
            raise ParamError(f"{param}: the text is not valid Unicode (a lone UTF-16 surrogate, or bytes that are "
                             f"not UTF-8)", param, "invalid_unicode")
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED:
                continue
            if name in UNSUPPORTED_UNLESS_NEUTRAL:
                if value is None or value == UNSUPPORTED_UNLESS_NEUTRAL[name]:
                    continue
                raise ParamError(f"'{name}' is not supported by this server", name, "unsupported_parameter")
            if name not in self.extra_known():
                raise ParamError(f"Unrecognized request argument supplied: {name}", name,
                                 "unrecognized_argument")
        return self

    def extra_known(self) -> set[str]:
        return set()

    @property
    def method(self) -> str | None:
        if self.speculative is None:
            return None
        if not self.speculative.enabled:
            return "ar"
        return self.speculative.method


def _message_doc(schema: dict) -> None:
    """The OpenAPI shape of a message, one per kind of role: only an assistant makes tool calls, and
    a tool message names the call it answers."""
    props = schema.pop("properties")
    schema.pop("required", None)
    base = {"content": props["content"], "name": props["name"]}
    schema["anyOf"] = [
        {"type": "object", "required": ["role"], "properties": {"role": {"enum": ["system", "user", "developer"]}, **base}},
        {"type": "object", "required": ["role"], "properties": {"role": {"enum": ["assistant"]}, **base,
                                                                "tool_calls": props["tool_calls"]}},
        {"type": "object", "required": ["role", "tool_call_id"],
         "properties": {"role": {"enum": ["tool"]}, **base, "tool_call_id": {"type": "string"}}}]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_message_doc)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = Field(default=None, json_schema_extra={"anyOf": [  # documented: text parts only
        {"type": "string"}, {"type": "null"},
        {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}}]})
    name: str | None = None
    tool_calls: list[dict] | None = Field(default=None, json_schema_extra={"anyOf": [  # an assistant's calls
        {"type": "null"}, {"type": "array", "items": TOOL_CALL_DOC}]})
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ParamError("only text content parts are supported", "messages", "unsupported_content")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "null"},
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"enum": ["json_schema"]},
            "json_schema": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "schema": {"type": "object"}, "strict": {"type": "boolean"}}}}}]})
    modalities: list[str] | None = None
    tools: list[dict] | None = Field(default=None, json_schema_extra={"anyOf": [  # documented: functions
        {"type": "null"}, {"type": "array", "items": TOOL_DOC}]})
    tool_choice: str | dict | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "null"}, {"enum": ["none", "auto"]},  # "required" and a named function need tools
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"enum": ["function"]}, "function": {"type": "object", "required": ["name"],
                                                         "properties": {"name": {"type": "string"}}}}}]})
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat_rules(self):
        _check_response_format(self.response_format)
        _check_tools(self.tools, self.tool_choice)
        for i, m in enumerate(self.messages):
            _check_message(m, f"messages[{i}]")
        if self.modalities and self.modalities != ["text"]:
            raise ParamError("only the text modality is supported", "modalities", "unsupported_parameter")
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs requires logprobs=true", "top_logprobs")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_choice_mode(self) -> str:
        """none | auto | required (a named function is required too)."""
        if not self.tools:
            return "none"
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice if isinstance(self.tool_choice, str) else "required"

    @property
    def tool_choice_name(self) -> str | None:
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None

    @property
    def calls_tools(self) -> bool:
        return self.tool_choice_mode != "none"

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _object(value, param: str) -> dict:
    if not isinstance(value, dict):
        raise ParamError(f"{param} must be an object", param, "invalid_value")
    return value


def _check_response_format(rf: dict | None) -> None:
    if rf is None:
        return
    kind = rf.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise ParamError("response_format.type must be 'text', 'json_object' or 'json_schema'", "response_format.type",
                         "invalid_value")
    if kind == "json_schema":
        spec = _object(rf.get("json_schema"), "response_format.json_schema")
        if not isinstance(spec.get("name"), str) or not FUNCTION_NAME.fullmatch(spec["name"]):
            raise ParamError("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
                             "response_format.json_schema.name", "invalid_value")
        if "schema" in spec:
            _object(spec["schema"], "response_format.json_schema.schema")
        if spec.get("strict") not in (None, True, False):
            raise ParamError("response_format.json_schema.strict must be a boolean",
                             "response_format.json_schema.strict", "invalid_value")


def _check_tools(tools: list[dict] | None, choice) -> None:
    names = set()
    for i, tool in enumerate(tools or []):
        param = f"tools[{i}]"
        _object(tool, param)
        if tool.get("type") != "function":
            raise ParamError(f"{param}.type must be 'function'", f"{param}.type", "invalid_value")
        function = _object(tool.get("function"), f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise ParamError(f"{param}.function.name must be 1-64 letters, digits, '_' or '-'",
                             f"{param}.function.name", "invalid_value")
        if name in names:
            raise ParamError(f"{param}.function.name: '{name}' is given twice", f"{param}.function.name",
                             "invalid_value")
        names.add(name)
        if function.get("parameters") is not None:
            _object(function["parameters"], f"{param}.function.parameters")
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ParamError("tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice",
                             "invalid_value")
        if choice == "required" and not tools:
            raise ParamError("tool_choice is only allowed when tools are specified", "tool_choice", "invalid_value")
        return
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ParamError("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}", "tool_choice", "invalid_value")
    if function["name"] not in names:
        raise ParamError(f"tool_choice.function.name: '{function['name']}' is not among the tools",
                         "tool_choice.function.name", "invalid_value")


def _check_message(m: ChatMessage, param: str) -> None:
    if m.role == "tool" and not isinstance(m.tool_call_id, str):
        raise ParamError(f"{param}.tool_call_id: a tool message answers a call, named by its id",
                         f"{param}.tool_call_id", "invalid_value")
    if m.tool_calls is not None:
        if m.role != "assistant":
            raise ParamError(f"{param}.tool_calls: only assistant messages make calls", f"{param}.tool_calls",
                             "invalid_value")
        for j, call in enumerate(m.tool_calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                    or not isinstance(function.get("arguments", ""), str):
                raise ParamError(f"{param}.tool_calls[{j}] must be {{'id', 'type': 'function', "
                                 f"'function': {{'name', 'arguments'}}}} with arguments a JSON string",
                                 f"{param}.tool_calls[{j}]", "invalid_value")


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(json_schema_extra={"anyOf": [  # documented: nothing empty
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]})
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt must not be empty")
        return prompts

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, OpenAI's shape."""

    error: ErrorDetail
