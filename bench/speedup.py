"""Does the server's speedup metric tell the truth? Its figures against a stopwatch, same workload.

For each concurrency level, the same greedy requests run through a live server with speculation
on, then off (the request's `speculative` extension), alternating for a few rounds. The measured speedup is the
ratio of the two phases' generated tokens per second of wall time, as a client sees it. Against
it, what the server reported for the "on" phase, read from /metrics:

- the gauge `logitspec_spec_decode_speedup` at the end of the last "on" phase (its last 60 s of decoding;
  the server idles 61 s before each level so that no earlier step is in that window),
- the counters: increase of `..._baseline_seconds_total` over increase of `..._step_seconds_total`,
- the per-request histogram's mean over the phase (`..._request_speedup` sum / count).

The server's figures cover decoding steps only; the stopwatch also sees prefill and HTTP, which
cost the same in both phases and so pull the measured ratio slightly toward 1.

    python bench/speedup.py                          # starts its own server on the default model
    python bench/speedup.py --levels 1,8 --max-tokens 256 --json out/speedup.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from decoding.specbench import first_turns  # noqa: E402


def scrape(http: httpx.Client) -> dict[str, float]:
    wanted = {"logitspec_spec_decode_speedup", "logitspec_spec_decode_baseline_seconds_total",
              "logitspec_spec_decode_step_seconds_total", "logitspec_spec_decode_request_speedup_sum",
              "logitspec_spec_decode_request_speedup_count"}
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name in wanted:
                out[s.name] = s.value
    return out


async def phase(url: str, texts: list[str], clients: int, max_tokens: int, speculative: bool) -> dict:
    """Every prompt once, `clients` at a time; returns answers, tokens and wall seconds."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(texts)):
        queue.put_nowait(i)
    answers: dict[int, str] = {}
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            r = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": texts[i]}], "max_tokens": max_tokens, "temperature": 0,
                "speculative": {"enabled": speculative}})
            r.raise_for_status()
            body = r.json()
            answers[i] = body["choices"][0]["message"]["content"]
            tokens += body["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"answers": [answers[i] for i in range(len(texts))], "tokens": tokens, "seconds": wall}


def level(url: str, texts: list[str], clients: int, max_tokens: int, settle: float, rounds: int) -> dict:
    """`rounds` alternations of the on and off phases, so that a drift in the machine's speed (a
    shared host) falls on both sides instead of on one phase."""
    http = httpx.Client(base_url=url, timeout=30)
    # The gauge covers the last 60 s of decoding steps: let earlier steps age out of it first.
    time.sleep(settle)
    names = ("logitspec_spec_decode_baseline_seconds_total", "logitspec_spec_decode_step_seconds_total",
             "logitspec_spec_decode_request_speedup_sum", "logitspec_spec_decode_request_speedup_count")
    sums = {side: {"tokens": 0, "seconds": 0.0, **{n: 0.0 for n in names}} for side in ("on", "off")}
    identical, gauge = True, None
    for _ in range(rounds):
        answers = {}
        for side in ("on", "off"):
            before = scrape(http)
            result = asyncio.run(phase(url, texts, clients, max_tokens, side == "on"))
            after = scrape(http)
            if side == "on":
                gauge = after["logitspec_spec_decode_speedup"]
            answers[side] = result["answers"]
            sums[side]["tokens"] += result["tokens"]
            sums[side]["seconds"] += result["seconds"]
            for n in names:
                sums[side][n] += after.get(n, 0.0) - before.get(n, 0.0)
        identical &= answers["on"] == answers["off"]
    on, off = sums["on"], sums["off"]
    measured = (on["tokens"] / on["seconds"]) / (off["tokens"] / off["seconds"])
    counters = on[names[0]] / on[names[1]]
    return {"clients": clients, "requests": len(texts) * rounds, "max_tokens": max_tokens, "rounds": rounds,
            "on_tokens": on["tokens"], "on_seconds": on["seconds"], "off_tokens": off["tokens"],
            "off_seconds": off["seconds"], "identical_answers": identical,
            "measured_speedup": measured, "gauge": gauge, "counters": counters,
            "per_request_mean": on[names[2]] / on[names[3]],
            # With speculation off every step is a plain one, so the server should report about 1 there.
            "off_phase_counters": off[names[0]] / off[names[1]],
            "on_step_seconds": on[names[1]], "on_baseline_seconds": on[names[0]],
            "off_step_seconds": off[names[1]], "off_baseline_seconds": off[names[0]],
            "gauge_vs_measured": gauge / measured - 1, "counters_vs_measured": counters / measured - 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="an already running server (default: start one)")
    ap.add_argument("--levels", default="1,8", help="concurrent clients, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="on/off alternations per level")
    ap.add_argument("--settle", type=float, default=61.0,
                    help="idle seconds before each level, so the gauge's 60 s window holds only that level")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    texts = first_turns()
    server, url = None, args.url
    if url is None:
        from server_process import ServerProcess

        print("starting a server on the default model ...", file=sys.stderr, flush=True)
        server = ServerProcess("--max-running", str(max(levels)), "--max-context", "2048")
        url = server.url
    rows = []
    try:
        asyncio.run(phase(url, texts[:1], 1, 8, True))  # warm-up
        for clients in levels:
            print(f"{clients} client(s): {args.rounds} rounds of {len(texts)} requests with speculation on, then off ...", file=sys.stderr,
                  flush=True)
            row = level(url, texts, clients, args.max_tokens, args.settle, args.rounds)
            rows.append(row)
            print(f"clients {clients:>2}: measured {row['measured_speedup']:.2f}x "
                  f"({row['on_tokens'] / row['on_seconds']:.1f} vs {row['off_tokens'] / row['off_seconds']:.1f} tok/s); "
                  f"server: gauge {row['gauge']:.2f}x ({row['gauge_vs_measured']:+.1%}), "
                  f"counters {row['counters']:.2f}x ({row['counters_vs_measured']:+.1%}), "
                  f"per-request mean {row['per_request_mean']:.2f}x; "
                  f"off phase as the server saw it {row['off_phase_counters']:.2f}x; "
                  f"answers identical on/off: {row['identical_answers']}", flush=True)
    finally:
        if server:
            server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
