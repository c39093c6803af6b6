"""Does a session's suffix index pay? MAT of turn 2 with and without a session key.

Runs the two-turn (MT-bench) questions of Spec-Bench against a live server, greedy: turn 1, then
turn 2 with the conversation so far, once with a `prompt_cache_key` (the session index holds turn
1's prompt and answer as generated tokens) and once without (the index holds only turn 2's prompt).
Prints the mean accepted tokens per step of turn 2 both ways.

    python bench/sessions.py [--url URL] [--per-category 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from decoding.specbench import DEFAULT_DATA, read_questions  # noqa: E402


def ask(http: httpx.Client, messages: list[dict], max_tokens: int, key: str | None) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if key:
        body["prompt_cache_key"] = key
    r = http.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None)
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    questions = [q for q in read_questions(DEFAULT_DATA, args.per_category) if len(q["turns"]) == 2]
    server = None
    url = args.url
    if url is None:
        from server_process import ServerProcess

        print("starting a server on the default model ...", file=sys.stderr, flush=True)
        server = ServerProcess("--max-context", "4096")
        url = server.url
    totals = {"session": [0, 0], "no session": [0, 0]}
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            for i, q in enumerate(questions, 1):
                for mode in ("session", "no session"):
                    key = f"bench-{uuid.uuid4().hex}" if mode == "session" else None
                    messages = [{"role": "user", "content": q["turns"][0]}]
                    first = ask(http, messages, args.max_tokens, key)
                    messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                                 {"role": "user", "content": q["turns"][1]}]
                    second = ask(http, messages, args.max_tokens, key)
                    totals[mode][0] += second["usage"]["completion_tokens"]
                    totals[mode][1] += second["speculative"]["steps"]
                print(f"\r{i}/{len(questions)} conversations", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        if server:
            server.stop()
    for mode, (tokens, steps) in totals.items():
        print(f"turn 2 {mode:>10}: MAT {tokens / steps:.2f} ({tokens} tokens in {steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
