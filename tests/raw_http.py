"""One HTTP/1.1 keep-alive connection driven by hand (h11 over a plain socket).

Every request goes over the same socket, and a server that closes or resets it makes the next
request fail here. A pooled client (httpx) would quietly open a new connection instead.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

import h11


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class KeepAlive:
    def __init__(self, port: int, headers: dict[str, str] | None = None, timeout: float = 60.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)
        self.headers = {"host": f"127.0.0.1:{port}", **(headers or {})}
        self.requests = 0

    def post(self, path: str, body: bytes | dict) -> Answer:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, raw, {"content-type": "application/json"})

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Answer:
        if self.requests:
            self.conn.start_next_cycle()  # raises unless both sides kept the connection open
        self.requests += 1
        fields = {**self.headers, **(headers or {}), "content-length": str(len(body))}
        self.sock.sendall(self.conn.send(h11.Request(method=method, target=path, headers=list(fields.items()))))
        self.sock.sendall(self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))
        status, answer_headers, parts = 0, {}, []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))  # b"": the server closed, h11 raises next
            elif isinstance(event, h11.Response):
                status = event.status_code
                answer_headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, answer_headers, b"".join(parts))
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection before answering")

    @property
    def reusable(self) -> bool:
        """Both sides would keep the connection for another request."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> KeepAlive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
