"""How often another --dtype gives the same greedy answer as the float32 path, token for token.

The float32 path runs the GGUF file's weights dequantized exactly; `--dtype gguf` runs the file's
own quantized blocks through llama.cpp, bfloat16 and float16 round the weights. Each is a choice
of numerics the user makes, and this is its measured price: on Spec-Bench questions (the first
`--per-category` of each category, chat template, greedy, `--max-new-tokens`), the share of answers
identical to float32's, and how far the others agree before they part.

    python bench/agreement.py [--dtype gguf] [--per-category 1] [--max-new-tokens 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.loader import load  # noqa: E402
from decoding.specbench import DEFAULT_DATA, read_questions  # noqa: E402
from decoding.verify import SamplingParams  # noqa: E402


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="gguf", help="the numerics compared with float32")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    loaded = load(None)
    base = Engine(EngineConfig(method="ar", dtype="float32", threads=args.threads), loaded=loaded)
    other = Engine(EngineConfig(method="ar", dtype=args.dtype, threads=args.threads), loaded=loaded)
    questions = read_questions(DEFAULT_DATA, args.per_category)
    rows = []
    t0 = time.perf_counter()
    for i, q in enumerate(questions):
        prompt = base.chat_prompt([{"role": "user", "content": q["turns"][0]}])
        a = base.generate(prompt, SamplingParams(), args.max_new_tokens).output
        b = other.generate(prompt, SamplingParams(), args.max_new_tokens).output
        rows.append({"category": q["category"], "identical": a == b, "common_prefix": common_prefix(a, b),
                     "float32_tokens": len(a), "other_tokens": len(b)})
        print(f"\r{i + 1}/{len(questions)} questions, {time.perf_counter() - t0:.0f} s", end="", file=sys.stderr,
              flush=True)
    print(file=sys.stderr)
    same = sum(r["identical"] for r in rows)
    parted = [r["common_prefix"] for r in rows if not r["identical"]]
    print(f"{args.dtype} ({other.numerics}) against float32, {len(rows)} Spec-Bench questions, "
          f"{args.max_new_tokens} new tokens, greedy")
    print(f"{'category':<16} {'identical':>9} {'same first tokens':>18}")
    for r in rows:
        print(f"{r['category']:<16} {'yes' if r['identical'] else 'no':>9} {r['common_prefix']:>18}")
    print(f"identical answers: {same}/{len(rows)} ({100 * same / len(rows):.0f}%)"
          + (f"; the others agree on their first {min(parted)}-{max(parted)} tokens "
             f"(median {sorted(parted)[len(parted) // 2]})" if parted else ""))
    if args.json:
        args.json.write_text(json.dumps({"dtype": args.dtype, "numerics": other.numerics,
                                         "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
