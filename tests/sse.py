"""Server-sent events as a client reads them: each `data:` line, with the `event:` named before it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator


class SSEParser:
    def __init__(self):
        self.event: str | None = None

    def feed(self, line: str) -> tuple[str | None, str] | None:
        """(event, data) when the line is a data line (event None for plain data), else None."""
        if line.startswith("event:"):
            self.event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            event, self.event = self.event, None
            return event, line[5:].strip()
        return None


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str | None, str]]:
    parser = SSEParser()
    for line in lines:
        if (item := parser.feed(line)) is not None:
            yield item


async def aiter_sse(response) -> AsyncIterator[tuple[str | None, str]]:
    """The events of an httpx streaming response, as they arrive."""
    parser = SSEParser()
    async for line in response.aiter_lines():
        if (item := parser.feed(line)) is not None:
            yield item


async def aiter_chunks(response) -> AsyncIterator[dict]:
    """The JSON chunks of an OpenAI-style stream, up to its [DONE]."""
    async for _, data in aiter_sse(response):
        if data == "[DONE]":
            return
        yield json.loads(data)
