"""The FastAPI app: OpenAI-compatible chat and text completions, streamed over SSE.

The handlers validate, tokenize and hand sequences to the scheduler; they never run the model.
Every error leaves in OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from decoding.engine import Engine
from decoding.verify import SamplingParams
from retrieval.sessions import SessionRegistry
from retrieval.suffix_index import SuffixIndex
from server.access import Access
from server.gate import APIKeys, Gate
from server.metrics import Metrics
from server.scheduler import Delta, Failed, Finished, GenRequest, QueueFull, Scheduler, ShuttingDown
from server.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse, ParamError, printable
from server.structured import ToolCallReader, chat_turns, output_grammar, read_all, template_renders_tools
from server.settings import ServerSettings

log = logging.getLogger("logitspec.server")

# The chat page at `/`: plain files, no build step. The policy keeps it on this origin: nothing is
# loaded from another host, and no inline script could run even if text were ever inserted as HTML.
STATIC = Path(__file__).resolve().parent / "static"
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
               504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": printable(message), "type": ERROR_TYPES.get(status, "server_error"),
                      "param": None if param is None else printable(param), "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_details(exc: ValidationError | RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) of a pydantic validation failure, for an OpenAI-shaped 400."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):
        return str(cause), cause.param, cause.code
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None, "invalid_json"
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param, "invalid_value"


# Documented in the OpenAPI schema: the bodies the routes parse by hand, and the error shape.
REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest)
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": description} for status, description in (
    (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
    (413, "Request body too large"), (429, "Queue full"), (500, "Generation failed"),
    (503, "Shutting down"))}


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _request_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprobs_chat(tokenizer, tokens, entries) -> dict:
    content = []
    for tok, (lp, alts) in zip(tokens, entries):
        t = tokenizer.decode([tok])
        content.append({"token": t, "logprob": lp, "bytes": list(t.encode()),
                        "top_logprobs": [{"token": tokenizer.decode([a]), "logprob": alp,
                                          "bytes": list(tokenizer.decode([a]).encode())} for a, alp in alts]})
    return {"content": content}


def _logprobs_text(tokenizer, tokens, entries) -> dict:
    return {"tokens": [tokenizer.decode([t]) for t in tokens], "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [{tokenizer.decode([a]): alp for a, alp in alts} for _, alts in entries],
            "text_offset": []}


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    scheduler = Scheduler(engine, max_queue=settings.max_queue)
    sessions = SessionRegistry(settings.max_sessions, settings.session_bytes)
    # Indexes of requests without a session: alive only while a sequence holds them (leak check).
    request_indexes: weakref.WeakSet[SuffixIndex] = weakref.WeakSet()
    tokenizer = engine.tokenizer
    context = engine.cache.max_len
    open_streams = 0

    metrics = Metrics(engine, scheduler, sessions)
    scheduler.metrics = metrics

    def count(path: str, status: int) -> None:
        if path.startswith("/v1/"):
            endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models") else "other"
            metrics.requests.labels(endpoint, str(status)).inc()

    access = Access(settings.access_log, count,
                    error_body=lambda: error_body(500, "internal server error", None, "internal_error"))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.shutdown()

    app = FastAPI(title="logitspec", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.scheduler = scheduler
    app.state.sessions = sessions
    app.state.engine = engine
    app.state.draining = False

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _req_validation(_, exc):
        return error_response(400, *_validation_details(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = APIError(413, f"the request body exceeds the server's limit of {limit} bytes", None,
                             "request_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: Request, schema):
        raw = await read_body(request)
        try:
            # Bytes that are not UTF-8 become lone surrogates here, so the schema refuses them naming
            # the field they are in; NaN and Infinity are Python's extensions, not JSON.
            data = json.loads(raw.decode(json.detect_encoding(raw), "surrogateescape"),
                              parse_constant=_not_json)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise APIError(400, "the request body is not valid JSON", None, "invalid_json")
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise APIError(400, *_validation_details(e))

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")

    def session_index(req, request: Request) -> SuffixIndex | None:
        """The session's index, filed under the API key's namespace: another key naming the same
        session gets a different index, and the registry never holds a client's raw key."""
        key = req.prompt_cache_key or req.user or request.headers.get("x-session-id")
        if not key:
            return None
        namespace = getattr(request.state, "key_namespace", "")
        return sessions.get(hashlib.sha256(f"{namespace}\0{key}".encode()).hexdigest())

    def request_index() -> SuffixIndex:
        index = SuffixIndex()
        request_indexes.add(index)
        return index

    def check_limits(req, prompts: list[list[int]], chat: bool) -> None:
        if req.n * len(prompts) > settings.max_n:
            raise APIError(400, f"this request asks for {req.n * len(prompts)} sequences (n x prompts); the "
                                f"server's limit is {settings.max_n}", "n", "too_many_choices")
        stops = req.stop or []
        if len(stops) > settings.max_stop:
            raise APIError(400, f"at most {settings.max_stop} stop sequences", "stop", "too_many_stop_sequences")
        if any(len(stop) > settings.max_stop_length for stop in stops):
            raise APIError(400, f"stop sequences must be at most {settings.max_stop_length} characters", "stop",
                           "stop_sequence_too_long")
        longest = max(len(p) for p in prompts)
        if settings.max_prompt_tokens is not None and longest > settings.max_prompt_tokens:
            raise APIError(400, f"the prompt has {longest} tokens; the server's limit is "
                                f"{settings.max_prompt_tokens}", "messages" if chat else "prompt", "prompt_too_long")
        cap = settings.max_tokens_cap
        asked = {"max_tokens", "max_completion_tokens"} & req.model_fields_set  # a default is capped, not refused
        if cap is not None and asked and req.token_limit is not None and req.token_limit > cap:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
            raise APIError(400, f"{param} is {req.token_limit}; the server's limit is {cap}", param,
                           "max_tokens_exceeded")

    def sampling(req, choice: int) -> SamplingParams:
        seed = None if req.seed is None else req.seed + choice  # n choices must differ
        # OpenAI's top_p 0 keeps the top token only (top-k 1); vLLM's top_k -1 is top-k off (0)
        top_k = 1 if req.top_p == 0 else max(req.top_k, 0)
        return SamplingParams(temperature=req.temperature, top_p=req.top_p or 1.0, top_k=top_k, seed=seed)

    def budget(req, prompt_len: int) -> int:
        limit = req.token_limit
        room = context - prompt_len - 1
        if limit is None:
            limit = room
        if settings.max_tokens_cap is not None:
            limit = min(limit, settings.max_tokens_cap)
        if prompt_len + limit + 1 > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you "
                                f"requested {prompt_len + limit} tokens ({prompt_len} in the prompt, {limit} "
                                f"for the completion). Please reduce the prompt or max_tokens.",
                           "max_tokens" if req.token_limit is not None else "messages", "context_length_exceeded")
        return limit

    def submit_all(req, prompts: list[list[int]], index, namespace: str, grammar: str | None) -> list[GenRequest]:
        gens = []
        try:
            for p_i, prompt in enumerate(prompts):
                limit = budget(req, len(prompt))
                for c in range(req.n):
                    gens.append(scheduler.submit(GenRequest(
                        prompt=prompt, params=sampling(req, c), max_tokens=limit, stop=req.stop,
                        logprobs=req.logprobs_k, method=req.method,
                        index=index if index is not None else request_index(), cache_namespace=namespace,
                        deadline=time.monotonic() + settings.request_timeout, grammar=grammar)))
        except QueueFull:
            for g in gens:
                g.cancel()
            raise APIError(429, "the server is at capacity; retry shortly", None, "queue_full",
                           {"Retry-After": "1"})
        except ShuttingDown:
            for g in gens:
                g.cancel()
            raise APIError(503, "the server is shutting down; retry on another replica", None, "shutting_down")
        except APIError:
            for g in gens:
                g.cancel()
            raise
        return gens

    async def collect(gen: GenRequest) -> dict:
        text, tokens, lps, fin = [], [], [], None
        while fin is None:
            ev = await gen.queue.get()
            if isinstance(ev, Delta):
                text.append(ev.text)
                tokens.extend(ev.tokens)
                lps.extend(ev.logprobs)
            elif isinstance(ev, Finished):
                fin = ev
            elif isinstance(ev, Failed):
                raise APIError(ev.status, ev.message, None, "generation_failed")
        return {"text": "".join(text), "tokens": tokens, "logprobs": lps, "finish": fin}

    def spec_stats(results: list[dict]) -> dict:
        steps = sum(r["finish"].steps for r in results)
        toks = sum(r["finish"].completion_tokens for r in results)
        return {"steps": steps, "mean_accepted_tokens": round(toks / steps, 3) if steps else 0.0}

    async def run(request: Request, req, prompts: list[list[int]], chat: bool, grammar: str | None = None):
        check_model(req.model)
        check_limits(req, prompts, chat)
        index = session_index(req, request)
        # Prefix-cache blocks stay within the API key's namespace: a hit's timing would tell one
        # key what another sent.
        gens = submit_all(req, prompts, index, getattr(request.state, "key_namespace", ""), grammar)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            return EventSourceResponse(stream(request, req, gens, rid, created, chat, prompt_tokens),
                                       ping=15)
        try:
            results = await asyncio.gather(*(collect(g) for g in gens))
        except BaseException:
            for g in gens:
                g.cancel()
            raise
        choices = []
        for i, r in enumerate(results):
            if chat:
                message = {"role": "assistant", "content": r["text"]}
                reason = r["finish"].reason
                if req.calls_tools:
                    content, calls = read_all(r["text"], True)
                    if calls:
                        message = {"role": "assistant", "content": content or None,
                                   "tool_calls": [c.as_message() for c in calls]}
                        reason = "tool_calls" if reason == "stop" else reason
                choice = {"index": i, "message": message,
                          "logprobs": _logprobs_chat(tokenizer, r["tokens"], r["logprobs"]) if req.logprobs else None,
                          "finish_reason": reason}
            else:
                choice = {"index": i, "text": r["text"],
                          "logprobs": _logprobs_text(tokenizer, r["tokens"], r["logprobs"])
                          if req.logprobs is not None else None,
                          "finish_reason": r["finish"].reason}
            choices.append(choice)
        completion = sum(r["finish"].completion_tokens for r in results)
        request.state.usage = (prompt_tokens, completion)  # for the access log
        return {"id": rid, "object": obj, "created": created, "model": settings.model_name,
                "choices": choices, "usage": _usage(prompt_tokens, completion),
                "system_fingerprint": None, "speculative": spec_stats(results)}

    async def stream(request: Request, req, gens, rid, created, chat, prompt_tokens):
        nonlocal open_streams
        open_streams += 1  # draining waits for this stream to end
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": settings.model_name}

        def chunk(i, delta=None, finish=None, extra=None, text=None, logprobs=None):
            if chat:
                c = {"index": i, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
            else:
                c = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            body = {**base, "choices": [c]}
            if extra:
                body["speculative"] = extra
            return {"data": json.dumps(body)}

        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, g):
            while True:
                ev = await g.queue.get()
                await merged.put((i, ev))
                if isinstance(ev, (Finished, Failed)):
                    return

        pumps = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        done, completion, steps = 0, 0, 0
        # Tool calls are read from each choice's text as it streams (server/structured.py).
        readers = [ToolCallReader(chat and req.calls_tools) for _ in gens]

        def pieces_chunks(i, pieces, stats, lp):
            for piece in pieces:
                if piece.kind == "content":
                    delta = {"content": piece.text}
                elif piece.kind == "call":
                    call = readers[i].calls[piece.call]
                    delta = {"tool_calls": [{"index": piece.call, "id": call.id, "type": "function",
                                             "function": {"name": call.name, "arguments": ""}}]}
                else:
                    delta = {"tool_calls": [{"index": piece.call, "function": {"arguments": piece.text}}]}
                yield chunk(i, delta, extra=stats, logprobs=lp)
                lp = None
            if lp:
                yield chunk(i, {"content": ""}, extra=stats, logprobs=lp)

        try:
            if chat:
                for i in range(len(gens)):
                    yield chunk(i, {"role": "assistant", "content": ""})
            while done < len(gens):
                i, ev = await merged.get()
                if isinstance(ev, Delta):
                    lp = None
                    if req.logprobs and ev.tokens:
                        lp = (_logprobs_chat(tokenizer, ev.tokens, ev.logprobs) if chat
                              else _logprobs_text(tokenizer, ev.tokens, ev.logprobs))
                    if ev.text or lp:
                        stats = {"step_tokens": len(ev.tokens)}
                        if chat:
                            for c in pieces_chunks(i, readers[i].feed(ev.text), stats, lp):
                                yield c
                        else:
                            yield chunk(i, text=ev.text, extra=stats, logprobs=lp)
                elif isinstance(ev, Finished):
                    done += 1
                    completion += ev.completion_tokens
                    steps += ev.steps
                    stats = {"steps": ev.steps,
                             "mean_accepted_tokens": round(ev.completion_tokens / ev.steps, 3) if ev.steps else 0.0}
                    reason = ev.reason
                    if chat:
                        for c in pieces_chunks(i, readers[i].finish(), None, None):
                            yield c
                        if readers[i].calls and reason == "stop":
                            reason = "tool_calls"
                    yield chunk(i, {}, finish=reason, extra=stats) if chat else chunk(i, finish=reason, extra=stats)
                elif isinstance(ev, Failed):
                    yield {"event": "error", "data": json.dumps(error_body(ev.status, ev.message, None,
                                                                           "generation_failed"))}
                    return
            request.state.usage = (prompt_tokens, completion)  # for the access log, written when the stream ends
            if req.stream_options and req.stream_options.include_usage:
                yield {"data": json.dumps({**base, "choices": [], "usage": _usage(prompt_tokens, completion)})}
            yield {"data": "[DONE]"}
        finally:
            # client gone or stream over: nothing of this request may keep running
            open_streams -= 1
            for g in gens:
                g.cancel()
            for p in pumps:
                p.cancel()

    async def drain(grace: float) -> None:
        """Stop admitting (503), let running requests finish for up to `grace` seconds, then fail
        what is left (an error event ends each remaining stream)."""
        app.state.draining = True
        started = time.monotonic()
        deadline = started + grace
        busy = access.in_flight
        log.info("shutting down: draining %d requests (grace %.1f s)", busy, grace)
        # until the requests it reports are out of the app too: a stream's last event is sent (the
        # scheduler idle, no stream open) a moment before its request leaves, and a drain that
        # stopped in that moment reported a finished request as still running
        while (not scheduler.idle or open_streams or access.in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not scheduler.idle:
            log.warning("shutdown grace of %.1f s over: failing %s", grace, scheduler.counts)
        left = access.in_flight
        log.info("shutting down: drained %d requests in %.1f s%s", max(busy - left, 0), time.monotonic() - started,
                 f", failing {left} still running" if left else "")
        await asyncio.to_thread(scheduler.shutdown)
        deadline = time.monotonic() + 2.0  # let the failed streams send their error events
        while open_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    app.state.drain = drain

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in REQUEST_MODELS:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                body["additionalProperties"] = False  # unknown parameters are refused (400)
                body["properties"]["model"] = {"anyOf": [{"enum": [settings.model_name]}, {"type": "null"}],
                                               "title": "Model"}  # the one model served
                body["properties"]["n"]["maximum"] = settings.max_n
                for name in ("max_tokens", "max_completion_tokens"):
                    if settings.max_tokens_cap is not None and name in body["properties"]:
                        body["properties"][name]["maximum"] = settings.max_tokens_cap
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    # Inside the access layer, so refusals are logged and counted too.
    app.add_middleware(Gate, keys=APIKeys(settings.api_keys), protect_metrics=not settings.public_metrics,
                       draining=lambda: app.state.draining, error_body=error_body)

    # The last resort for any exception: a 500 in OpenAI's shape, never a reset connection. Starlette's
    # own (ServerErrorMiddleware, outside every middleware) answers and then re-raises, and uvicorn
    # closes a connection on which the app raised, failing the client's next request on it too.
    app.add_middleware(access.around)

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        body = {"status": "draining" if app.state.draining else "ok", **scheduler.counts,
                "sessions": len(sessions), "request_sessions": len(request_indexes)}
        return JSONResponse(body, status_code=503 if app.state.draining else 200)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY,
                                                            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "logitspec"}]}

    @app.post("/v1/chat/completions", openapi_extra=_request_body(ChatCompletionRequest),
              responses=ERROR_RESPONSES)
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        try:
            turns, template_tools = chat_turns(req, template_renders_tools(tokenizer))
            # Compiling schemas takes milliseconds (the first one also builds the grammar
            # tokenizer, about 0.5 s): off the event loop.
            grammar = await asyncio.to_thread(output_grammar, req, engine.grammars)
        except ParamError as e:
            raise APIError(400, str(e), e.param, e.code)
        prompt = engine.chat_prompt(turns, template_tools)
        return await run(request, req, [prompt], chat=True, grammar=grammar)

    @app.post("/v1/completions", openapi_extra=_request_body(CompletionRequest), responses=ERROR_RESPONSES)
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = [tokenizer.encode(p) for p in req.prompt]
        if any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        return await run(request, req, prompts, chat=False)

    if settings.cors_origins:  # outermost: preflights and refusals carry CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Session-ID"],
                           expose_headers=["Retry-After"], max_age=600)
    return app
