"""The test clients' SSE reader, on literal lines."""

import asyncio

from sse import aiter_sse, sse_events

LINES = ["data: {\"a\": 1}", "", ": ping", "event: error", "data: {\"error\": {}}", "", "data: [DONE]", ""]
EXPECTED = [(None, '{"a": 1}'), ("error", '{"error": {}}'), (None, "[DONE]")]


def test_each_data_line_with_the_event_named_before_it():
    assert list(sse_events(LINES)) == EXPECTED


def test_the_async_reader_gives_the_same_events():
    class Response:
        async def aiter_lines(self):
            for line in LINES:
                yield line

    async def read():
        return [item async for item in aiter_sse(Response())]

    assert asyncio.run(read()) == EXPECTED
