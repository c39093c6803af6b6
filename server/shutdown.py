"""Graceful shutdown: on SIGTERM (or Ctrl-C) stop admitting, let running requests finish for the
grace period, fail what is left, then exit. A second signal exits at once.

uvicorn alone would close the listening socket at once and then wait for open connections; here
the socket stays open while draining, so a new request gets a clear 503 (and `/health` a 503 that
takes the replica out of a load balancer) instead of a refused connection, and the app decides
when running streams are over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import uvicorn

log = logging.getLogger("logitspec.server")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Callable[[float], Awaitable[None]], grace: float):
        super().__init__(config)
        self.drain = drain
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None  # referenced so it is not collected mid-drain

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)
        log.info("stopped")

    def handle_exit(self, sig, frame) -> None:
        # A signal handler (or another thread): hand the drain to the event loop.
        if self._draining or self._loop is None:
            self.force_exit = self._draining  # second signal: now
            self.should_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain(self.grace)
        finally:
            self.should_exit = True
