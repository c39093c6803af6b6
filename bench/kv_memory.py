"""KV memory at a long context limit: `logitspec serve --max-context 32768 --max-running 16` on the
default model, 16 concurrent short requests, and what the server holds.

Prints the KV budget the server chose, its blocks in use (sampled from /metrics while the
requests run), and the server process's resident memory before and after, against what slots x
context would have reserved.

    python bench/kv_memory.py
    python bench/kv_memory.py --max-context 32768 --clients 16 --kv-memory 1GiB
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def rss_mib(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def gauges(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("logitspec_kv_"):
            out[name[len("logitspec_"):]] = float(value)
    return out


async def one(http: httpx.AsyncClient, i: int, max_tokens: int) -> int:
    r = await http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": f"Give me one fact about the number {i}."}],
        "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def burst(url: str, clients: int, max_tokens: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        return await asyncio.gather(*(one(http, i, max_tokens) for i in range(clients)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-context", type=int, default=32768)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-memory", default=None, help="pass --kv-memory to the server (default: its auto)")
    ap.add_argument("--root", default=str(ROOT), help="the checkout to start the server from (an older build "
                    "without KV block metrics prints resident memory only)")
    args = ap.parse_args()

    from server_process import ServerProcess

    flags = ["--max-context", str(args.max_context), "--max-running", str(args.clients)]
    if args.kv_memory:
        flags += ["--kv-memory", args.kv_memory]
    proc = ServerProcess(*flags, root=Path(args.root))
    try:
        before = rss_mib(proc.proc.pid)
        g0 = gauges(proc.url)
        peak = {"blocks": 0.0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak["blocks"] = max(peak["blocks"], gauges(proc.url).get("kv_blocks_used", 0))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        tokens = asyncio.run(burst(proc.url, args.clients, args.max_tokens))
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        after = rss_mib(proc.proc.pid)
        g1 = gauges(proc.url)
    finally:
        proc.stop()
    print(f"server: {args.root} --max-context {args.max_context} --max-running {args.clients}")
    print(f"{args.clients} concurrent requests: {sum(tokens)} tokens generated in {seconds:.1f} s, all answered")
    print(f"resident memory: {before[0]:.0f} MiB before, {after[0]:.0f} MiB after (peak {after[1]:.0f} MiB)")
    if "kv_block_size" not in g0:
        return 0
    block = g0["kv_block_size"]
    print(f"KV pool: {g0['kv_blocks']:.0f} blocks of {block:.0f} tokens = {g0['kv_blocks'] * block:.0f} tokens "
          f"(slots x context would be {args.clients} x {args.max_context} = {args.clients * args.max_context} tokens, "
          f"before the model's own context limit)")
    print(f"blocks in use at the peak (sampled): {peak['blocks']:.0f} = {peak['blocks'] * block:.0f} tokens; "
          f"after: used {g1['kv_blocks_used']:.0f}, cached {g1['kv_blocks_cached']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
