"""`logitspec bench` for two builds in one run: before and after a change, alternating.

Each Spec-Bench category is one `logitspec bench` process per build (the same questions, greedy),
and the builds alternate from category to category (which goes first alternates too), so a shared
host's drift falls on both. Prints tokens/s per method and build, overall and per category, the
after/before ratios, and each build's mismatches against its own `ar`.

    python bench/ab_specbench.py --build before=/path/to/old/checkout --build after=. \\
        --per-category 1 --max-new-tokens 128 --methods ar,logitspec
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding.specbench import DEFAULT_DATA, read_questions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", required=True, metavar="NAME=PATH", help="exactly two")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--methods", default="ar,logitspec")
    ap.add_argument("--json", default=None)
    ap.add_argument("extra", nargs="*", help="more `logitspec bench` flags, after --")
    args = ap.parse_args()
    builds = dict(b.split("=", 1) for b in args.build)
    if len(builds) != 2:
        raise SystemExit("give exactly two --build NAME=PATH")
    methods = args.methods.split(",")
    questions = read_questions(DEFAULT_DATA, args.per_category)
    categories = list(dict.fromkeys(q["category"] for q in questions))
    tally = {b: {m: defaultdict(float) for m in methods} for b in builds}  # build -> method -> {tokens, seconds}
    per_cat: dict[tuple[str, str, str], float] = {}
    mismatches = {b: defaultdict(int) for b in builds}
    with tempfile.TemporaryDirectory() as tmp:
        for i, category in enumerate(categories):
            data = Path(tmp) / f"{category}.jsonl"
            data.write_text("".join(json.dumps(q) + "\n" for q in questions if q["category"] == category))
            order = list(builds) if i % 2 == 0 else list(builds)[::-1]
            for name in order:
                out = Path(tmp) / f"{name}-{category}.json"
                cmd = [sys.executable, "-m", "server.cli", "bench", "--data", str(data), "--methods", args.methods,
                       "--max-new-tokens", str(args.max_new_tokens), "--json", str(out), *args.extra]
                subprocess.run(cmd, cwd=builds[name], check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                report = json.loads(out.read_text())
                for m in methods:
                    o = report["methods"][m]["overall"]
                    tally[name][m]["tokens"] += o["new_tokens"]
                    tally[name][m]["seconds"] += o["new_tokens"] / o["tokens_per_s"] if o["tokens_per_s"] else 0
                    per_cat[(name, m, category)] = o["tokens_per_s"]
                for m, n in report.get("mismatches", {}).items():
                    mismatches[name][m] += n
                print(f"[ab] {category}: {name} " + ", ".join(f"{m} {per_cat[(name, m, category)]:.1f} tok/s"
                                                        for m in methods), file=sys.stderr, flush=True)
    first, second = builds
    lines = [f"{'category':<16} " + " ".join(f"{m + ' ' + b:>22}" for m in methods for b in builds)
             + " " + " ".join(f"{m + ' ' + second + '/' + first:>24}" for m in methods)]
    for category in categories:
        lines.append(f"{category:<16} " + " ".join(f"{per_cat[(b, m, category)]:>22.1f}" for m in methods for b in builds)
                     + " " + " ".join(f"{per_cat[(second, m, category)] / per_cat[(first, m, category)]:>23.2f}x"
                                      for m in methods))

    def overall(b, m):
        t = tally[b][m]
        return t["tokens"] / t["seconds"] if t["seconds"] else 0.0

    lines.append(f"{'overall':<16} " + " ".join(f"{overall(b, m):>22.1f}" for m in methods for b in builds)
                 + " " + " ".join(f"{overall(second, m) / overall(first, m):>23.2f}x" for m in methods))
    for b in builds:
        lines.append(f"mismatches against ar, {b}: " + (", ".join(f"{m} {n}" for m, n in mismatches[b].items()) or "none"))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"per_category": {f"{b}|{m}|{c}": v for (b, m, c), v in per_cat.items()},
                                               "overall": {f"{b}|{m}": overall(b, m) for b in builds for m in methods},
                                               "mismatches": mismatches}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
