"""What happens to every request at the door: the request counter, one access-log line, and the
last resort for an exception that nothing inside handled.

Plain ASGI rather than BaseHTTPMiddleware, so streams pass untouched and a stream's line is
written when the stream ends, with its token counts. An exception is never re-raised from here:
uvicorn closes a connection on which the app raised, so the client's next request on that
keep-alive connection would fail too. Before the response has started, the client gets a 500 in
OpenAI's shape; a stream that has started ends with an `error` event, as a failed generation does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

log = logging.getLogger("logitspec.server")
access_log = logging.getLogger("logitspec.access")


class Access:
    """ASGI middleware. `count(path, status)` is called when a response starts; `error_body()` is the
    body of a last-resort 500. `in_flight`: requests inside the app now (the drain reports them)."""

    def __init__(self, log_requests: bool, count: Callable[[str, int], None], error_body: Callable[[], dict]):
        self.app = None
        self.log_requests = log_requests
        self.count = count
        self.error_body = error_body
        self.in_flight = 0

    def around(self, app) -> Access:
        """The middleware factory for `app.add_middleware(access.around)`: the app keeps this instance."""
        self.app = app
        return self

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.monotonic()
        state = scope.setdefault("state", {})  # `request.state` of the handlers: they leave the usage there
        sent = {"status": None, "stream": False, "ended": False}

        async def watch(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                ctype = dict(message.get("headers") or ()).get(b"content-type", b"")
                sent["stream"] = ctype.startswith(b"text/event-stream")
                self.count(scope["path"], message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["ended"] = True
            await send(message)

        self.in_flight += 1
        failed = False
        try:
            await self.app(scope, receive, watch)
        except Exception:  # not BaseException: a cancellation (client gone, shutdown) goes on up
            failed = True
            log.exception("unhandled error in %s %s", scope.get("method"), scope["path"])
            await self._answer(watch, sent)
        finally:
            self.in_flight -= 1
            if self.log_requests:
                self._log(scope, sent, time.monotonic() - began, state.get("usage"), failed)

    async def _answer(self, send, sent: dict) -> None:
        try:
            body = json.dumps(self.error_body()).encode()
            if sent["status"] is None:
                await send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            elif not sent["ended"]:
                if sent["stream"]:
                    await send({"type": "http.response.body", "body": b"event: error\r\ndata: " + body + b"\r\n\r\n",
                                "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except Exception:  # the client is gone: nothing left to tell it
            log.debug("could not send the error response", exc_info=True)

    @staticmethod
    def _log(scope, sent: dict, seconds: float, usage, failed: bool) -> None:
        client = scope.get("client")
        who = f"{client[0]}:{client[1]}" if client else "-"
        line = f'{who} "{scope.get("method")} {scope["path"]}" {sent["status"] or "-"} {seconds:.3f}s'
        if sent["stream"]:
            line += " stream"
        if usage is not None:
            line += f" prompt_tokens={usage[0]} completion_tokens={usage[1]}"
        if failed:
            line += " unhandled-error"
        access_log.info(line)
