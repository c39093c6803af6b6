"""Soak test: many concurrent streaming clients against a live server for a bounded time, with
random mid-stream disconnects and a share of malformed requests.

It checks that no answer is lost or mixed (every completed greedy stream equals that prompt's
answer when asked alone, non-streamed, before the soak), that every malformed request gets a 4xx
in OpenAI's error shape, and that at the end nothing is left: running sequences, KV slots and
request-scoped session indexes back to zero. It reports the server's resident memory growth.

    python bench/soak.py                                   # starts its own server on the default model
    python bench/soak.py --clients 64 --seconds 600 --json out/soak.json
    python bench/soak.py --url http://127.0.0.1:8000 --api-key KEY --pid 1234   # an existing server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sse import aiter_sse  # noqa: E402

PROMPTS = [
    "Name three rivers.", "What is 12 times 7?", "Write a haiku about rain.", "List four fruits.",
    "Translate 'good morning' into French.", "Give me a title for a mystery novel.",
    "Explain gravity in one sentence.", "What colour is the sky on Mars?",
    "Write a Python function that adds two numbers.", "Name a famous painter.",
    "Summarize: the cat sat on the mat and slept all day.", "Count from one to five.",
]


def malformed_requests(model: str, key: str | None) -> list[tuple[str, dict, bytes]]:
    """(what, headers, body): requests a server must refuse with a 4xx in OpenAI's shape."""
    good = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    cases = [
        ("not json", auth, b"{not json"),
        ("json array", auth, b"[1, 2, 3]"),
        ("no messages", auth, json.dumps({"model": model, "messages": []}).encode()),
        ("temperature 7", auth, json.dumps({**good, "temperature": 7}).encode()),
        ("unknown parameter", auth, json.dumps({**good, "frobnicate": True}).encode()),
        ("tools", auth, json.dumps({**good, "tools": [{"type": "function"}]}).encode()),
        ("max_tokens beyond context", auth, json.dumps({**good, "max_tokens": 10**7}).encode()),
        ("unknown model", auth, json.dumps({**good, "model": "gpt-99"}).encode()),
        ("bad role", auth, json.dumps({**good, "messages": [{"role": "wizard", "content": "x"}]}).encode()),
        ("truncated", auth, json.dumps(good).encode()[:-7]),
    ]
    if key:
        cases += [("no key", {"Authorization": ""}, json.dumps(good).encode()),
                  ("wrong key", {"Authorization": "Bearer not-the-key-000"}, json.dumps(good).encode())]
    return cases


@dataclass
class SoakReport:
    clients: int
    seconds: float
    max_tokens: int
    requests: int = 0
    completed: int = 0  # streams read to [DONE]
    disconnects: int = 0  # streams the client dropped mid-way on purpose
    malformed: int = 0
    malformed_wrong: int = 0  # malformed requests not refused with a 4xx in OpenAI's shape
    mismatches: int = 0  # completed answers that differ from the prompt's answer alone
    mixed: int = 0  # streams whose chunks carry more than one id
    errors: int = 0  # unexpected statuses, error events, transport errors
    busy: int = 0  # 429 answers (queue full), retried
    rss_start_mb: float | None = None
    rss_end_mb: float | None = None
    rss_growth_mb: float | None = None
    final: dict = field(default_factory=dict)  # /health at the end
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        f = self.final
        rss = (f"RSS {self.rss_start_mb:.0f} -> {self.rss_end_mb:.0f} MB (growth {self.rss_growth_mb:+.1f} MB)"
               if self.rss_start_mb is not None else "RSS not measured (no --pid)")
        return [
            f"soak: {self.clients} streaming clients for {self.seconds:.0f} s, max_tokens {self.max_tokens}",
            f"requests {self.requests}: completed {self.completed}, disconnects {self.disconnects}, malformed "
            f"{self.malformed} (wrongly answered {self.malformed_wrong}), queue-full {self.busy}",
            f"mismatches {self.mismatches}, mixed streams {self.mixed}, unexpected errors {self.errors}",
            rss,
            f"final: running {f.get('running')}, prefilling {f.get('prefilling')}, waiting {f.get('waiting')}, "
            f"kv slots {f.get('kv_slots_used')}, request-scoped sessions {f.get('request_sessions')}, "
            f"sessions {f.get('sessions')}",
            *self.notes[:10],
        ]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def chat_body(model: str, prompt: str, max_tokens: int, stream: bool, session: str | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    if session:
        body["prompt_cache_key"] = session
    return body


async def references(http: httpx.AsyncClient, model: str, max_tokens: int) -> dict[str, str]:
    """Each prompt's greedy answer, asked alone and non-streamed."""
    out = {}
    for prompt in PROMPTS:
        r = await http.post("/v1/chat/completions", json=chat_body(model, prompt, max_tokens, False))
        r.raise_for_status()
        out[prompt] = r.json()["choices"][0]["message"]["content"]
    return out


async def stream_once(http, report: SoakReport, model: str, prompt: str, expected: str, max_tokens: int,
                      drop_after: int | None, session: str | None) -> None:
    ids, text, done, error = set(), [], False, None
    async with http.stream("POST", "/v1/chat/completions",
                           json=chat_body(model, prompt, max_tokens, True, session)) as r:
        if r.status_code == 429:
            report.busy += 1
            await asyncio.sleep(0.5)
            return
        if r.status_code != 200:
            report.errors += 1
            report.notes.append(f"stream status {r.status_code}: {(await r.aread())[:200]!r}")
            return
        chunks = 0
        async for event, data in aiter_sse(r):
            if event == "error":
                error = data
            elif data == "[DONE]":
                done = True
            else:
                chunk = json.loads(data)
                ids.add(chunk["id"])
                if chunk["choices"]:
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
                chunks += 1
            if drop_after is not None and chunks >= drop_after:
                report.disconnects += 1
                return  # leaving the block closes the connection mid-stream
    if error is not None or not done:
        report.errors += 1
        report.notes.append(f"stream ended without [DONE]: {error}")
        return
    report.completed += 1
    if len(ids) != 1:
        report.mixed += 1
    if "".join(text) != expected:
        report.mismatches += 1
        report.notes.append(f"mismatch for {prompt!r}: {''.join(text)!r} != {expected!r}")


async def malformed_once(http, report: SoakReport, case: tuple[str, dict, bytes]) -> None:
    what, headers, body = case
    report.malformed += 1
    r = await http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json", **headers})
    try:
        err = r.json()["error"]
        ok = 400 <= r.status_code < 500 and set(err) == {"message", "type", "param", "code"} and err["message"]
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        report.malformed_wrong += 1
        report.notes.append(f"malformed '{what}' answered {r.status_code}: {r.text[:200]}")


async def soak(url: str, clients: int = 32, seconds: float = 60.0, max_tokens: int = 24, api_key: str | None = None,
               pid: int | None = None, disconnect_share: float = 0.2, malformed_share: float = 0.15,
               session_share: float = 0.3, seed: int = 0) -> SoakReport:
    report = SoakReport(clients, seconds, max_tokens)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers, limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        expected = await references(http, model, max_tokens)
        bad = malformed_requests(model, api_key)
        # Warm-up: every KV slot used once, so the memory baseline already holds the cache pages
        # that any batch touches (the cache is allocated lazily) and growth means a leak.
        await asyncio.gather(*(http.post("/v1/chat/completions", json=chat_body(model, PROMPTS[c % len(PROMPTS)],
                                                                              max_tokens, False))
                               for c in range(clients)))
        report.rss_start_mb = rss_mb(pid)
        deadline = time.monotonic() + seconds

        async def client(c: int) -> None:
            rng = random.Random(seed * 1000 + c)
            while time.monotonic() < deadline:
                report.requests += 1
                try:
                    if rng.random() < malformed_share:
                        await malformed_once(http, report, rng.choice(bad))
                        continue
                    prompt = rng.choice(PROMPTS)
                    drop = rng.randint(1, 4) if rng.random() < disconnect_share else None
                    session = f"soak-{c}" if rng.random() < session_share else None
                    await stream_once(http, report, model, prompt, expected[prompt], max_tokens, drop, session)
                except httpx.HTTPError as e:
                    report.errors += 1
                    report.notes.append(f"transport error: {type(e).__name__}: {e}")

        t0 = time.monotonic()
        await asyncio.gather(*(client(c) for c in range(clients)))
        report.seconds = time.monotonic() - t0
        # Disconnects are noticed by the server within a step; give it a moment to settle.
        settle = time.monotonic() + 30
        while True:
            report.final = (await http.get("/health")).json()
            f = report.final
            if f["running"] == f["prefilling"] == f["waiting"] == f["kv_slots_used"] == f["request_sessions"] == 0:
                break
            if time.monotonic() > settle:
                break
            await asyncio.sleep(0.25)
    report.rss_end_mb = rss_mb(pid)
    if report.rss_start_mb is not None and report.rss_end_mb is not None:
        report.rss_growth_mb = report.rss_end_mb - report.rss_start_mb
    return report


SERVER_ARGS = ("--max-running", "32", "--max-queue", "256", "--max-context", "512", "--tree-capacity", "16")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="an existing server (default: start one on the default model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--pid", type=int, default=None, help="the existing server's process id, for its memory")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=0, help="server torch threads when starting one (0 = default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    server = None
    url, key, pid = args.url, args.api_key, args.pid
    if url is None:
        from server_process import ServerProcess

        key = key or "soak-key-000001"
        server = ServerProcess(*SERVER_ARGS, "--threads", str(args.threads), "--api-key", key)
        url, pid = server.url, server.proc.pid
    try:
        report = asyncio.run(soak(url, args.clients, args.seconds, args.max_tokens, key, pid, seed=args.seed))
    finally:
        if server is not None:
            server.stop()
    print("\n".join(report.lines()))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))
    clean = (report.mismatches == report.mixed == report.errors == report.malformed_wrong == 0
             and all(report.final.get(k) == 0 for k in ("running", "kv_slots_used", "request_sessions")))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
