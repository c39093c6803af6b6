"""The FastAPI app: OpenAI-compatible chat and text completions, streamed over SSE.

The handlers validate, tokenize and hand sequences to the scheduler; they never run the model.
Every error leaves in OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoding.engine import Engine
from decoding.verify import SamplingParams
from retrieval.sessions import SessionRegistry
from server.metrics import Metrics
from server.scheduler import Delta, Failed, Finished, GenRequest, QueueFull, Scheduler
from server.schemas import ChatCompletionRequest, CompletionRequest, ParamError

log = logging.getLogger("logitspec.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
               504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


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


@dataclass
class ServerSettings:
    model_name: str
    max_queue: int = 64
    request_timeout: float = 600.0
    max_sessions: int = 256
    session_bytes: int = 512 * 2**20


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
    tokenizer = engine.tokenizer
    context = engine.cache.max_len

    metrics = Metrics(engine, scheduler, sessions)
    scheduler.metrics = metrics

    app = FastAPI(title="logitspec", version="0.1.0")
    app.state.metrics = metrics
    app.state.scheduler = scheduler
    app.state.sessions = sessions
    app.state.engine = engine

    @app.on_event("startup")
    async def _start():
        scheduler.start()

    @app.on_event("shutdown")
    async def _stop():
        scheduler.shutdown()

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _req_validation(_, exc):
        return error_response(400, *_validation_details(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", None, "internal_error")

    async def parse(request: Request, schema):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
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

    def session_index(req, request: Request):
        key = req.prompt_cache_key or req.user or request.headers.get("x-session-id")
        return sessions.get(key) if key else None

    def sampling(req, choice: int) -> SamplingParams:
        seed = None if req.seed is None else req.seed + choice  # n choices must differ
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=seed)

    def budget(req, prompt_len: int) -> int:
        limit = req.token_limit
        room = context - prompt_len - 1
        if limit is None:
            limit = room
        if prompt_len + limit + 1 > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you "
                                f"requested {prompt_len + limit} tokens ({prompt_len} in the prompt, {limit} "
                                f"for the completion). Please reduce the prompt or max_tokens.",
                           "max_tokens" if req.token_limit is not None else "messages", "context_length_exceeded")
        return limit

    def submit_all(req, prompts: list[list[int]], index) -> list[GenRequest]:
        gens = []
        try:
            for p_i, prompt in enumerate(prompts):
                limit = budget(req, len(prompt))
                for c in range(req.n):
                    gens.append(scheduler.submit(GenRequest(
                        prompt=prompt, params=sampling(req, c), max_tokens=limit, stop=req.stop,
                        logprobs=req.logprobs_k, method=req.method, index=index,
                        deadline=time.monotonic() + settings.request_timeout)))
        except QueueFull:
            for g in gens:
                g.cancel()
            raise APIError(429, "the server is at capacity; retry shortly", None, "queue_full",
                           {"Retry-After": "1"})
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

    async def run(request: Request, req, prompts: list[list[int]], chat: bool):
        check_model(req.model)
        index = session_index(req, request)
        gens = submit_all(req, prompts, index)
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
                choice = {"index": i, "message": {"role": "assistant", "content": r["text"]},
                          "logprobs": _logprobs_chat(tokenizer, r["tokens"], r["logprobs"]) if req.logprobs else None,
                          "finish_reason": r["finish"].reason}
            else:
                choice = {"index": i, "text": r["text"],
                          "logprobs": _logprobs_text(tokenizer, r["tokens"], r["logprobs"])
                          if req.logprobs is not None else None,
                          "finish_reason": r["finish"].reason}
            choices.append(choice)
        completion = sum(r["finish"].completion_tokens for r in results)
        return {"id": rid, "object": obj, "created": created, "model": settings.model_name,
                "choices": choices, "usage": _usage(prompt_tokens, completion),
                "system_fingerprint": None, "speculative": spec_stats(results)}

    async def stream(request: Request, req, gens, rid, created, chat, prompt_tokens):
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
                        yield (chunk(i, {"content": ev.text}, extra=stats, logprobs=lp) if chat
                               else chunk(i, text=ev.text, extra=stats, logprobs=lp))
                elif isinstance(ev, Finished):
                    done += 1
                    completion += ev.completion_tokens
                    steps += ev.steps
                    stats = {"steps": ev.steps,
                             "mean_accepted_tokens": round(ev.completion_tokens / ev.steps, 3) if ev.steps else 0.0}
                    yield chunk(i, {}, finish=ev.reason, extra=stats) if chat else chunk(i, finish=ev.reason, extra=stats)
                elif isinstance(ev, Failed):
                    yield {"event": "error", "data": json.dumps(error_body(ev.status, ev.message, None,
                                                                           "generation_failed"))}
                    return
            if req.stream_options and req.stream_options.include_usage:
                yield {"data": json.dumps({**base, "choices": [], "usage": _usage(prompt_tokens, completion)})}
            yield {"data": "[DONE]"}
        finally:
            # client gone or stream over: nothing of this request may keep running
            for g in gens:
                g.cancel()
            for p in pumps:
                p.cancel()

    @app.middleware("http")
    async def _count_requests(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        if path.startswith("/v1/"):
            endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models") else "other"
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.counts, "sessions": len(sessions)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "logitspec"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
        except ParamError as e:
            raise APIError(400, str(e), e.param, e.code)
        prompt = engine.chat_prompt(messages)
        return await run(request, req, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = [tokenizer.encode(p) for p in req.prompt]
        if any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        return await run(request, req, prompts, chat=False)

    return app
