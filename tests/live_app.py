"""Serve an app with uvicorn on a thread of the test process: real HTTP and SSE, and the engine
stays reachable from the test (fault injection, internal state)."""

from __future__ import annotations

import threading
import time

import uvicorn

from server.shutdown import GracefulServer
from server_process import free_port


class LiveApp:
    """`grace`: serve with the graceful shutdown of `logitspec serve`; `server.handle_exit(SIGTERM,
    None)` then does what the signal does."""

    def __init__(self, app, grace: float | None = None):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=2)
        self.server = (uvicorn.Server(config) if grace is None
                       else GracefulServer(config, app.state.drain, grace))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
