"""Multi-turn chat benchmark: time to first token per turn, prefix caching on against off.

A chat front-end sends the whole conversation at every turn. Two servers on the default model,
one with prefix caching and one without (`--no-prefix-caching`), get the same 5-turn
conversations through the streaming API (greedy, one `prompt_cache_key` per conversation), their
requests interleaved turn by turn so that a shared host's drift falls on both:

- documents: a long Spec-Bench summarization or RAG input (about 1,000-1,500 tokens), then four
  follow-up questions about it;
- MT-bench: Spec-Bench's two-turn questions of one category chained into five turns.

    python bench/multiturn.py                       # 2 document and 1 MT-bench conversations
    python bench/multiturn.py --documents 3 --mt 2 --json out/multiturn.json --plot docs/multiturn_cpu.png
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

FOLLOW_UPS = ["Summarize that in one sentence.", "Which people or organisations does it mention?",
              "What is the most important number in it?", "Suggest a short title for it."]
TURNS = 5


def conversations(documents: int, mt: int, min_chars: int, max_chars: int) -> list[tuple[str, list[str]]]:
    questions = read_questions(DEFAULT_DATA)
    out = []
    long_inputs = [q for q in questions if q["category"] in ("summarization", "rag")
                   and min_chars <= len(q["turns"][0]) <= max_chars]
    for q in long_inputs[:documents]:
        out.append((f"document {q['question_id']} ({q['category']})", [q["turns"][0]] + FOLLOW_UPS))
    by_category: dict[str, list[dict]] = {}
    for q in questions:
        if len(q["turns"]) >= 2:
            by_category.setdefault(q["category"], []).append(q)
    for category in list(by_category)[:mt]:
        turns = [t for q in by_category[category][:3] for t in q["turns"]][:TURNS]
        out.append((f"MT-bench {category}", turns))
    return out


async def turn(http: httpx.AsyncClient, messages: list[dict], key: str, max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "prompt_cache_key": key}
    t0 = time.perf_counter()
    first, text, usage = None, [], {}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for chunk in aiter_chunks(r):
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - t0
                text.append(chunk["choices"][0]["delta"]["content"])
    return {"ttft": first if first is not None else time.perf_counter() - t0, "text": "".join(text),
            "prompt_tokens": usage.get("prompt_tokens", 0)}


def cache_counters(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("logitspec_prefix_cache_queries_total", "logitspec_prefix_cache_hits_total"):
            values[name] = float(value)
    return values.get("logitspec_prefix_cache_queries_total", 0.0), values.get("logitspec_prefix_cache_hits_total", 0.0)


async def run(servers: dict[str, str], convs: list[tuple[str, list[str]]], max_tokens: int) -> list[dict]:
    rows = []
    clients = {name: httpx.AsyncClient(base_url=url, timeout=900) for name, url in servers.items()}
    try:
        for c, (label, turns) in enumerate(convs):
            histories = {name: [] for name in servers}
            for t, user in enumerate(turns):
                row = {"conversation": label, "turn": t + 1}
                order = list(servers) if (c + t) % 2 == 0 else list(servers)[::-1]
                for name in order:
                    histories[name].append({"role": "user", "content": user})
                    result = await turn(clients[name], histories[name], f"bench-{c}-{name}", max_tokens)
                    histories[name].append({"role": "assistant", "content": result["text"]})
                    row[name] = result["ttft"]
                    row["prompt_tokens"] = result["prompt_tokens"]
                    row[f"{name}_text"] = result["text"]
                row["same_text"] = len({row[f"{n}_text"] for n in servers}) == 1
                rows.append(row)
                print(f"[multiturn] {label} turn {t + 1}: {row['prompt_tokens']} prompt tokens, "
                      + ", ".join(f"{n} {row[n] * 1000:.0f} ms" for n in servers), file=sys.stderr, flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'conversation':<34} {'turn':>4} {'prompt':>6} {'TTFT on':>9} {'TTFT off':>9} {'on/off':>7} same",
             "-" * 80]
    for r in rows:
        lines.append(f"{r['conversation']:<34} {r['turn']:>4} {r['prompt_tokens']:>6} {r['on'] * 1000:>7.0f}ms "
                     f"{r['off'] * 1000:>7.0f}ms {r['on'] / r['off']:>7.2f} {'yes' if r['same_text'] else 'NO'}")
    later = [r for r in rows if r["turn"] > 1]
    lines.append("-" * 80)
    for kind in ("document", "MT-bench"):
        part = [r for r in later if r["conversation"].startswith(kind)]
        if part:
            on, off = sum(r["on"] for r in part), sum(r["off"] for r in part)
            lines.append(f"turns 2-{TURNS}, {kind} conversations: TTFT with caching {on / off:.1%} of without "
                         f"(mean {statistics.mean(r['on'] for r in part) * 1000:.0f} ms against "
                         f"{statistics.mean(r['off'] for r in part) * 1000:.0f} ms)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["conversation"] for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.4), sharey=True, squeeze=False)
    for ax, label in zip(axes[0], labels):
        part = [r for r in rows if r["conversation"] == label]
        turns = [r["turn"] for r in part]
        ax.plot(turns, [r["off"] for r in part], "o-", label="prefix caching off")
        ax.plot(turns, [r["on"] for r in part], "o-", label="prefix caching on")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("turn")
        ax.set_xticks(turns)
    axes[0][0].set_ylabel("time to first token (s)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--documents", type=int, default=2, help="conversations over long documents")
    ap.add_argument("--mt", type=int, default=1, help="conversations of chained MT-bench questions")
    ap.add_argument("--min-chars", type=int, default=4500, help="shortest document (characters)")
    ap.add_argument("--max-chars", type=int, default=7000, help="longest document (characters)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of TTFT per turn")
    args = ap.parse_args()

    from server_process import ServerProcess

    convs = conversations(args.documents, args.mt, args.min_chars, args.max_chars)
    started = {}
    try:
        for name, flags in (("on", ()), ("off", ("--no-prefix-caching",))):
            print(f"starting the server with prefix caching {name} ...", file=sys.stderr, flush=True)
            started[name] = ServerProcess("--max-context", "4096", "--max-running", "2", *flags)
        rows = asyncio.run(run({n: p.url for n, p in started.items()}, convs, args.max_tokens))
        queries, hits = cache_counters(started["on"].url)
    finally:
        for proc in started.values():
            proc.stop()
    print(table(rows))
    print(f"server with caching: {hits:.0f} of {queries:.0f} prompt tokens found in the prefix cache")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
