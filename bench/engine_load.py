"""The load benchmark's traffic without HTTP: several builds' engines, in-process, one after another.

    python bench/engine_load.py --build before=PATH --build after=PATH [--clients 16] [--requests 64] [--rounds 2]

Each build runs in its own process (its checkout's code) on the default model: `requests` greedy
requests with bench/load.py's prompts (Spec-Bench first turns under 600 characters, 96 new
tokens, speculation off), at most `clients` running at once, a new one started (prefilled whole)
as soon as one finishes. Builds alternate round by round; it prints each run's tokens/s and mean
step time, and the builds' median tokens/s against the first's. What it leaves out next to
bench/load.py (the HTTP edge, streaming, chunked prefill interleaved with decoding) is what a gap
between the two benchmarks points at.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import load_prompts  # noqa: E402

RUN = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
from decoding.config import EngineConfig
from decoding.engine import Engine
from decoding.verify import SamplingParams
clients, requests = int(sys.argv[2]), int(sys.argv[3])
texts = json.load(sys.stdin)
engine = Engine(EngineConfig(method="ar", max_batch=clients, max_context=2048))
prompts = [engine.chat_prompt([{"role": "user", "content": t}]) for t in texts]
todo = [prompts[i % len(prompts)] for i in range(requests)]
running, tokens, steps, stepping = [], 0, 0, 0.0
t0 = time.perf_counter()
while todo or running:
    while todo and len(running) < clients:
        running.append(engine.start_sequence(todo.pop(0), SamplingParams(), 96))
    t = time.perf_counter()
    engine.step(running)
    stepping += time.perf_counter() - t
    steps += 1
    for seq in [s for s in running if s.finished]:
        tokens += len(seq.output)
        engine.stop_sequence(seq)
        running.remove(seq)
seconds = time.perf_counter() - t0
print(f"RESULT {tokens} {seconds:.3f} {steps} {stepping / steps:.5f}")
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    builds = dict(b.split("=", 1) for b in args.build)
    texts = json.dumps(load_prompts())  # chosen here: every build runs the same prompts
    rates: dict[str, list[float]] = {name: [] for name in builds}
    for r in range(args.rounds):
        for name, path in builds.items():
            out = subprocess.run([sys.executable, "-c", RUN, str(Path(path).resolve()), str(args.clients),
                                  str(args.requests)], input=texts, capture_output=True, text=True,
                                 check=True).stdout
            tokens, seconds, steps, step = out.split("RESULT ")[1].split()
            rate = int(tokens) / float(seconds)
            rates[name].append(rate)
            print(f"round {r + 1} {name}: {tokens} tokens in {float(seconds):.1f} s, {rate:.1f} tok/s, "
                  f"{steps} steps of {1000 * float(step):.1f} ms", flush=True)
    first = next(iter(builds))
    for name in builds:
        print(f"{name}: median {statistics.median(rates[name]):.1f} tok/s, "
              f"{statistics.median(rates[name]) / statistics.median(rates[first]):.2f}x {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
