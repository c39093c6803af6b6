"""Write the acceptance statistics shipped for a model (decoding/priors/), from questions of our own.

A process with no saved statistics starts from this prior instead of from none
(decoding/statistics_cache.py). One engine, from no statistics, answers every question of
bench/prior_prompts.jsonl (written for this, in Spec-Bench's categories but none of its
questions: the benchmarks never measure the text a prior learned from) with logitspec and then
with pld, turn by turn, greedy, as a server would, and its statistics are written where the
engine looks for them. Run it again when node kinds change (statistics_cache.FORMAT), and
commit the file.

    python bench/make_prior.py                     # the embedded default model
    python bench/make_prior.py --model path/to/model.gguf --out /tmp/prior.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding import statistics_cache  # noqa: E402
from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.specbench import read_questions  # noqa: E402
from decoding.verify import SamplingParams  # noqa: E402

PROMPTS = ROOT / "bench" / "prior_prompts.jsonl"
METHODS = ("logitspec", "pld")  # the methods that draft; each teaches its own node kinds


def teach(engine: Engine, questions: list[dict], max_new_tokens: int) -> int:
    """Every question's turns with every method (its own answers in its history); turns run."""
    done, t0 = 0, time.perf_counter()
    total = sum(len(q["turns"]) for q in questions) * len(METHODS)
    for q in questions:
        for m in METHODS:
            history = []
            for text in q["turns"]:
                history.append({"role": "user", "content": text})
                seq = engine.generate(engine.chat_prompt(history), SamplingParams(), max_new_tokens, method=m)
                history.append({"role": "assistant", "content": engine.tokenizer.decode(seq.output)})
                done += 1
                print(f"\r[prior] {done}/{total} answers, {time.perf_counter() - t0:.0f}s", end="", file=sys.stderr,
                      flush=True)
    print(file=sys.stderr)
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or HF folder (default: the embedded model)")
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", default=None, help="where to write (default: decoding/priors/<model>.json)")
    args = ap.parse_args()
    engine = Engine(EngineConfig(model=args.model, max_context=4096, prior_statistics=False))
    questions = read_questions(Path(args.prompts))
    turns = teach(engine, questions, args.max_new_tokens)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    source = (f"bench/make_prior.py: {len(questions)} questions of {Path(args.prompts).name} ({turns} answers, "
              f"{', '.join(METHODS)}), {args.max_new_tokens} new tokens, greedy; {date.today()}, at {commit}")
    path = statistics_cache.write_prior(engine.loaded, engine.stats.state(), source,
                                        Path(args.out) if args.out else None)
    print(f"[prior] {len(engine.stats.kinds)} node kinds written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
