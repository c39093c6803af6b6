"""What may enter: an API key on the API routes, and no new work once the server drains.

`/v1/*` needs `Authorization: Bearer KEY` when keys are configured (and `/metrics` unless it is
made public); everything else (`/health`, the chat page, static files, the OpenAPI schema) stays
open. A request that passes carries its key's namespace in `request.state.key_namespace`, which
is all the app ever learns of the key: sessions are filed under it, so one key cannot reach
another key's sessions. Plain ASGI rather than BaseHTTPMiddleware, so streams pass untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable

ANONYMOUS = ""  # the namespace of every request when no keys are configured


def key_namespace(key: str) -> str:
    """A stable, non-reversible name for a key (the key itself is never stored beside sessions)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class APIKeys:
    def __init__(self, keys: tuple[str, ...] | list[str]):
        self._keys = [(k.encode(), key_namespace(k)) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def namespace(self, authorization: str | None) -> str | None:
        """The namespace of the key in an `Authorization: Bearer KEY` header; None if no key matches."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = token.strip().encode()
        found = None
        for key, namespace in self._keys:  # compare with every key: timing tells nothing about which matched
            if hmac.compare_digest(key, presented):
                found = namespace
        return found


def is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class Gate:
    """ASGI middleware: 503 while draining, 401 without a valid key, else pass with the key's namespace."""

    def __init__(self, app, keys: APIKeys, protect_metrics: bool, draining: Callable[[], bool],
                 error_body: Callable[..., dict]):
        self.app = app
        self.keys = keys
        self.protect_metrics = protect_metrics
        self.draining = draining
        self.error_body = error_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        api = is_api_path(path)
        if api and self.draining():
            return await self._refuse(send, 503, "the server is shutting down; retry on another replica",
                                      "shutting_down", {"connection": "close", "retry-after": "1"})
        namespace = ANONYMOUS
        if self.keys and (api or (self.protect_metrics and path == "/metrics")):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            namespace = self.keys.namespace(header)
            if namespace is None:
                message = ("Incorrect API key provided." if header else
                           "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
                return await self._refuse(send, 401, message, "invalid_api_key", {"www-authenticate": "Bearer"})
        scope.setdefault("state", {})["key_namespace"] = namespace
        return await self.app(scope, receive, send)

    async def _refuse(self, send, status: int, message: str, code: str, headers: dict[str, str]) -> None:
        body = json.dumps(self.error_body(status, message, None, code)).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
