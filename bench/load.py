"""Load benchmark: real HTTP streaming clients against a live logitspec server.

For each concurrency level and with speculation on and off (the request's `speculative`
extension, same server, same prompts), it prints aggregate tokens/s, time to first token and
inter-token latency percentiles.

    python bench/load.py                      # starts its own server on the default model
    python bench/load.py --url http://host:8000 --levels 1,4,8,16 --requests-per-client 2

Two builds in one run (before/after a change): `--server NAME=PATH` (a checkout to start a server
from) or `--server NAME=URL`, repeated. Servers then alternate inside every round as speculation
does, so a shared host's drift falls on all of them, and each row names its server. Each row also
reports the attention calls per decoding step, from the server's own counters where it has them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from decoding.specbench import DEFAULT_DATA, read_questions  # noqa: E402
from sse import aiter_chunks  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(http: httpx.AsyncClient, prompt: str, max_tokens: int, speculative: bool) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
            "speculative": {"enabled": speculative}}
    t0 = time.perf_counter()
    first, arrivals, tokens = None, [], 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for chunk in aiter_chunks(r):
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                n = (chunk.get("speculative") or {}).get("step_tokens", 1)
                arrivals.append((now, n))
    # inter-token latency: time between content chunks divided by the tokens each chunk carried
    itl = [(b[0] - a[0]) / max(b[1], 1) for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": first or float("nan"), "itl": itl, "tokens": tokens, "seconds": time.perf_counter() - t0}


async def run_level(url: str, prompts: list[str], clients: int, per_client: int, max_tokens: int,
                    speculative: bool) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def client(c: int) -> list[dict]:
            out = []
            for i in range(per_client):
                out.append(await one_request(http, prompts[(c * per_client + i) % len(prompts)], max_tokens,
                                             speculative))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    return summarize(clients, speculative, results, wall)


def summarize(clients: int, speculative: bool, results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    itls = [x for r in results for x in r["itl"]]
    return {"clients": clients, "speculative": speculative, "requests": len(results), "tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_p50": percentile(ttfts, 0.5), "ttft_p95": percentile(ttfts, 0.95),
            "itl_p50": percentile(itls, 0.5), "itl_p95": percentile(itls, 0.95), "wall_s": wall,
            "results": results}


def merge(parts: list[dict]) -> dict:
    """Rounds of one level and mode as one: tokens over summed wall time, percentiles over all requests."""
    results = [r for p in parts for r in p["results"]]
    row = summarize(parts[0]["clients"], parts[0]["speculative"], results, sum(p["wall_s"] for p in parts))
    row["rounds"] = [round(p["tokens_per_s"], 2) for p in parts]
    counted = [p for p in parts if p.get("steps")]
    steps = sum(p["steps"] for p in counted)
    row["attention_calls_per_step"] = (sum(p["attention_calls"] for p in counted) / steps) if steps else None
    # Decoding steps and their mean time, from the server's counters: a gap between two servers
    # is then either slower steps or more of them (smaller batches).
    row["decode_steps"] = steps or None
    row["ms_per_step"] = 1000 * sum(p.get("step_seconds", 0) for p in counted) / steps if steps else None
    return row


def engine_counters(url: str) -> dict[str, float]:
    """The server's decoding-step and attention-call counters (absent in older builds)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        for name in ("logitspec_decode_steps_total", "logitspec_decode_attention_calls_total",
                     "logitspec_spec_decode_step_seconds_total"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    return out


def measured_level(url: str, prompts: list[str], clients: int, per_client: int, max_tokens: int,
                   speculative: bool) -> dict:
    before = engine_counters(url)
    part = asyncio.run(run_level(url, prompts, clients, per_client, max_tokens, speculative))
    after = engine_counters(url)
    if "logitspec_decode_steps_total" in before and "logitspec_decode_attention_calls_total" in before:
        part["steps"] = after["logitspec_decode_steps_total"] - before["logitspec_decode_steps_total"]
        part["attention_calls"] = (after["logitspec_decode_attention_calls_total"]
                                   - before["logitspec_decode_attention_calls_total"])
        part["step_seconds"] = (after.get("logitspec_spec_decode_step_seconds_total", 0)
                                - before.get("logitspec_spec_decode_step_seconds_total", 0))
    return part


def load_prompts() -> list[str]:
    """The benchmark's prompts: Spec-Bench first turns under 600 characters, 3 per category."""
    return [q["turns"][0] for q in read_questions(DEFAULT_DATA, per_category=3) if len(q["turns"][0]) < 600]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="an already running server (default: start one)")
    ap.add_argument("--server", action="append", default=[], metavar="NAME=PATH|URL",
                    help="compare servers in one run: a checkout to start one from, or a URL (repeatable)")
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2, help="alternating off/on rounds per level")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    prompts = load_prompts()
    levels = [int(x) for x in args.levels.split(",")]
    specs = args.server or [f"this={args.url}" if args.url else f"this={ROOT}"]
    servers, started = {}, []
    try:
        from server_process import ServerProcess

        for spec in specs:
            name, _, where = spec.partition("=")
            if where.startswith("http"):
                servers[name] = where
                continue
            print(f"starting a server from {where} on the default model ...", file=sys.stderr, flush=True)
            proc = ServerProcess("--max-running", str(max(levels)), "--max-queue", "256", "--max-context", "2048",
                                 root=Path(where))
            started.append(proc)
            servers[name] = proc.url
        rows = run_levels(servers, prompts, levels, args)
    finally:
        for proc in started:
            proc.stop()
    label = len(servers) > 1
    by = {(r["server"], r["clients"], r["speculative"]): r for r in rows}
    for name in servers:
        prefix = f"[{name}] " if label else ""
        for spec in (True, False):
            if (name, 1, spec) in by and (name, 8, spec) in by:
                print(f"{prefix}scaling at 8 clients vs 1 (speculation {'on' if spec else 'off'}): "
                      f"{by[(name, 8, spec)]['tokens_per_s'] / by[(name, 1, spec)]['tokens_per_s']:.2f}x")
        for c in levels:
            if (name, c, True) in by and (name, c, False) in by:
                print(f"{prefix}speculation on/off at {c} clients: "
                      f"{by[(name, c, True)]['tokens_per_s'] / by[(name, c, False)]['tokens_per_s']:.2f}x")
    if label:
        first, *others = servers
        for other in others:
            for c in levels:
                for spec in (False, True):
                    a, b = by[(first, c, spec)], by[(other, c, spec)]
                    print(f"{other}/{first} at {c} clients, speculation {'on ' if spec else 'off'}: "
                          f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "results"} for r in rows],
                                              indent=1))
    return 0


def run_levels(servers: dict[str, str], prompts: list[str], levels: list[int], args) -> list[dict]:
    rows = []
    for url in servers.values():
        asyncio.run(run_level(url, prompts, 1, 1, 8, True))  # warm-up
    for clients in levels:
        # Unmeasured first: a fresh batch size starts from the cost model's priors (acceptance
        # rates, a draft token's surcharge at this batch), which a running server has learned.
        for url in servers.values():
            for spec in (True, False):
                asyncio.run(run_level(url, prompts, clients, 1, args.max_tokens, spec))
        # Off and on (and the servers) alternate for a few rounds, so that a shared host's drift
        # falls on all of them.
        rounds = {(name, spec): [] for name in servers for spec in (False, True)}
        for r in range(args.rounds):
            order = [(name, spec) for name in servers for spec in (False, True)]
            for name, spec in order if r % 2 == 0 else order[::-1]:
                part = measured_level(servers[name], prompts, clients, args.requests_per_client, args.max_tokens,
                                      spec)
                rounds[(name, spec)].append(part)
                print(f"[load] {name}: {clients} clients, round {r + 1}/{args.rounds}, speculation "
                      f"{'on' if spec else 'off'}: {part['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        for (name, spec), parts in rounds.items():
            row = merge(parts)
            row["server"] = name
            rows.append(row)
            calls = row["attention_calls_per_step"]
            print(f"{name + ': ' if len(servers) > 1 else ''}clients {clients:>3} speculation "
                  f"{'on ' if spec else 'off'}: {row['tokens_per_s']:6.1f} tok/s "
                  f"aggregate, TTFT p50 {row['ttft_p50'] * 1000:6.0f} ms p95 {row['ttft_p95'] * 1000:6.0f} ms, "
                  f"ITL p50 {row['itl_p50'] * 1000:5.1f} ms p95 {row['itl_p95'] * 1000:5.1f} ms, attention calls/step "
                  f"{'-' if calls is None else f'{calls:.0f}'}, "
                  + (f"{row['decode_steps']:.0f} steps of {row['ms_per_step']:.1f} ms " if row["ms_per_step"] else "")
                  + f"({row['requests']} requests, {row['tokens']} tokens)",
                  flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
