"""A bounded soak: 32 concurrent streaming clients for about a minute on the real model, with
random mid-stream disconnects and malformed requests (bench/soak.py has the longer version)."""

import asyncio

import pytest

from bench.soak import SERVER_ARGS, soak
from server_process import ServerProcess

pytestmark = pytest.mark.slow

KEY = "soak-key-000001"


def test_soak_32_streaming_clients():
    # One torch thread: on a shared 2-core machine two OpenMP threads that compete with another
    # process run many times slower than one.
    server = ServerProcess(*SERVER_ARGS, "--threads", "1", "--api-key", KEY)
    try:
        report = asyncio.run(soak(server.url, clients=32, seconds=60, max_tokens=16, api_key=KEY,
                                  pid=server.proc.pid))
    finally:
        server.stop()
    print("\n" + "\n".join(report.lines()))
    assert report.completed >= 32 and report.disconnects > 0 and report.malformed > 0
    assert report.mismatches == report.mixed == report.errors == report.malformed_wrong == 0, report.notes
    final = report.final
    assert final["running"] == final["prefilling"] == final["waiting"] == 0
    assert final["kv_slots_used"] == final["request_sessions"] == 0
    assert report.rss_growth_mb < 200, report.rss_growth_mb
