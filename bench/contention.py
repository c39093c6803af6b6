"""Plain decoding on a CPU that other processes keep busy: libgomp's default spin-wait against the
`logitspec` command's default (server/cli.py), interleaved, quiet and loaded.

Each run is one `logitspec generate --method ar` process (greedy, the default model); the load is
`--busy` processes of `while True: pass`, started before the run and stopped after it. Prints tok/s
per setting, quiet and loaded, each run's figure and the median. A run that has not finished in
`--timeout` seconds counts as 0 tok/s (libgomp's default can be 30x slower under load).

    python bench/contention.py [--busy 2] [--reps 3] [--max-tokens 64] [--timeout 150]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> environment for the run (unset = the logitspec command's own default)
    "libgomp default (GOMP_SPINCOUNT=300000)": {"GOMP_SPINCOUNT": "300000"},
    "logitspec default (GOMP_SPINCOUNT=1000)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}
PROMPT = "Write a short poem about the sea."


def run_once(env: dict, max_tokens: int, timeout: float) -> float:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    cmd = [sys.executable, "-m", "server.cli", "generate", "--method", "ar", "--max-tokens", str(max_tokens),
           "--prompt", PROMPT]
    try:
        out = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, timeout=timeout,
                             cwd=ROOT)
    except subprocess.TimeoutExpired:
        return 0.0
    m = re.search(r"([0-9.]+) tok/s", out.stdout + out.stderr)
    if out.returncode != 0 or not m:
        raise SystemExit(f"generate failed:\n{out.stderr[-2000:]}")
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes in the loaded runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=150.0)
    args = ap.parse_args()
    results = {(name, load): [] for name in SETTINGS for load in ("quiet", "loaded")}
    for rep in range(args.reps):
        for load in ("quiet", "loaded"):
            for name, env in SETTINGS.items():
                busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(
                    args.busy if load == "loaded" else 0)]
                try:
                    time.sleep(1 if busy else 0)
                    tps = run_once(env, args.max_tokens, args.timeout)
                finally:
                    for p in busy:
                        p.kill()
                        p.wait()
                results[(name, load)].append(tps)
                print(f"[contention] rep {rep + 1}/{args.reps} {load:6} {name}: {tps} tok/s", file=sys.stderr,
                      flush=True)
    print(f"plain decoding (ar), {args.max_tokens} tokens, {os.cpu_count()} CPUs, loaded = {args.busy} busy "
          f"processes; tok/s per run, median")
    for name in SETTINGS:
        cells = []
        for load in ("quiet", "loaded"):
            runs = results[(name, load)]
            cells.append(f"{load} {statistics.median(runs):5.1f} ({', '.join(f'{r:.1f}' for r in runs)})")
        print(f"{name:42} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
