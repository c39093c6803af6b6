"""A restarted server: from empty acceptance statistics, or from those the last one saved?

`logitspec serve` saves its acceptance statistics and the next server on the same model starts
from them (decoding/statistics_cache.py). This measures what that is worth on the real engine.
First a teacher engine per method answers held-out Spec-Bench questions (the next `--teach`
questions of each category after the measured ones: earlier traffic, never the questions
measured). Then, category by category, four engines just started answer that category's first
`--per-category` questions side by side, step by step (decoding/specbench.py's run_turn, so the
machine's slow and fast moments fall on all four alike): each method cold (empty statistics, as
before this change) and restarted (the teacher's statistics, read back through their file
format). Every category gets four new engines: each starts as a server does, with a fresh cost
model (from the cached calibration) and, cold, with nothing learned.

With `--start-from prior` there are no teachers: the second engine of each method starts from
the prior shipped for the model (decoding/priors/, what a first start or a fresh replica reads
when nothing was saved), learned from questions that are not Spec-Bench's (bench/make_prior.py).

    python bench/restart_statistics.py --per-category 3 --teach 3 --max-new-tokens 256
    python bench/restart_statistics.py --categories math_reasoning,qa --rounds 3
    python bench/restart_statistics.py --per-category 3 --max-new-tokens 256 --start-from prior
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding import statistics_cache  # noqa: E402
from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine, freeze_start_up_heap  # noqa: E402
from decoding.loader import load  # noqa: E402
from decoding.specbench import DEFAULT_DATA, conversation, read_questions  # noqa: E402

METHODS = ("pld", "logitspec")


def answer(engines: dict[str, Engine], question: dict, turns_done: int, max_new_tokens: int,
           tally: dict[str, list[float]] | None = None) -> int:
    """One question, every engine side by side; into tally: [tokens, seconds] per engine. Returns
    turns_done plus this question's turns."""
    for seqs, spent in conversation(engines, question, turns_done, max_new_tokens):
        if len({tuple(seq.output) for seq in seqs.values()}) != 1:
            raise SystemExit(f"outputs differ between engines on question {question.get('question_id')}: "
                             "speculation must not change greedy output")
        if tally is not None:
            for name, seq in seqs.items():
                tally[name][0] += len(seq.output)
                tally[name][1] += spent[name]
        turns_done += 1
    return turns_done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--per-category", type=int, default=3, help="questions measured per category (the first ones)")
    ap.add_argument("--teach", type=int, default=3, help="held-out questions per category the teachers answer")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--categories", default="", help="comma-separated (default: every category)")
    ap.add_argument("--rounds", type=int, default=1, help="times each category is measured (new engines each time)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--start-from", choices=("teachers", "prior"), default="teachers",
                    help="the warm engines' statistics: what teachers learned on held-out questions, or the "
                         "prior shipped for the model")
    args = ap.parse_args()
    warm = "restarted" if args.start_from == "teachers" else "prior"

    questions = read_questions(Path(args.data), args.per_category + args.teach)
    seen: dict[str, int] = defaultdict(int)
    measured, held_out = defaultdict(list), []
    for q in questions:
        seen[q["category"]] += 1
        (measured[q["category"]] if seen[q["category"]] <= args.per_category else held_out).append(q)
    categories = [c for c in args.categories.split(",") if c] or list(measured)
    for c in categories:
        if c not in measured:
            raise SystemExit(f"no category {c!r} in {args.data}")

    # Every engine starts from no statistics (not the prior shipped for the model): a cold start is
    # what is measured against a restart.
    base = EngineConfig(max_context=4096, prior_statistics=False)
    loaded = load(base.model)
    model = None

    def start(method: str) -> Engine:
        nonlocal model
        engine = Engine(replace(base, method=method), loaded=loaded, model=model)
        model = engine.model
        return engine

    t0 = time.perf_counter()
    if args.start_from == "prior":
        prior = statistics_cache.load_prior(loaded)
        if prior is None:
            raise SystemExit(f"no prior shipped for {loaded.name} (bench/make_prior.py writes one)")
        saved = {m: json.dumps(prior) for m in METHODS}
        freeze_start_up_heap()
        turns = 0
    else:
        teachers = {m: start(m) for m in METHODS}
        freeze_start_up_heap()
        turns = 0
        for i, q in enumerate(held_out, 1):
            turns = answer(teachers, q, turns, args.max_new_tokens)
            print(f"\r[restart] teaching: {i}/{len(held_out)} held-out questions, {time.perf_counter() - t0:.0f}s",
                  end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        saved = {m: json.dumps(teachers[m].stats.state()) for m in METHODS}  # as the cache file holds them
        print(f"[restart] teachers' statistics: " + ", ".join(f"{m} {len(teachers[m].stats.kinds)} kinds" for m in METHODS),
              file=sys.stderr)
        del teachers

    names = [f"{m} {state}" for state in ("cold", warm) for m in METHODS]
    rows: dict[str, dict[str, list[float]]] = {}
    for c in categories:
        tally: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for _ in range(args.rounds):
            engines = {name: start(name.split()[0]) for name in names}
            for m in METHODS:
                engines[f"{m} {warm}"].stats.restore(json.loads(saved[m]))
            for q in measured[c]:
                turns = answer(engines, q, turns, args.max_new_tokens, tally)
        rows[c] = dict(tally)
        speeds = {name: tally[name][0] / tally[name][1] for name in names}
        print(f"[restart] {c}: " + ", ".join(f"{name} {speeds[name]:.1f}" for name in names)
              + f" tok/s ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)

    def speed(keys: list[str], name: str) -> float:
        return sum(rows[k][name][0] for k in keys) / sum(rows[k][name][1] for k in keys)

    width = 20
    print(f"tok/s, {args.per_category} questions per category, {args.max_new_tokens} new tokens, greedy; "
          + (f"teachers: {args.teach} held-out questions per category" if args.start_from == "teachers" else
             "warm: the prior shipped for the model") + f"; {args.rounds} round(s)")
    print(f"{'category':<16}" + "".join(f"{n:>{width}}" for n in names)
          + f"{'ls/pld cold':>14}{'ls/pld ' + warm:>18}{'ls ' + warm + '/cold':>19}")
    ratios = defaultdict(dict)
    for key in categories + ["overall"]:
        keys = categories if key == "overall" else [key]
        s = {n: speed(keys, n) for n in names}
        ratios[key] = {"cold": s["logitspec cold"] / s["pld cold"],
                       warm: s[f"logitspec {warm}"] / s[f"pld {warm}"],
                       "logitspec gain": s[f"logitspec {warm}"] / s["logitspec cold"],
                       "pld gain": s[f"pld {warm}"] / s["pld cold"], "tok/s": s}
        print(f"{key:<16}" + "".join(f"{s[n]:>{width}.1f}" for n in names)
              + f"{ratios[key]['cold']:>13.3f}x{ratios[key][warm]:>17.3f}x{ratios[key]['logitspec gain']:>18.3f}x")
    low = {state: min(categories, key=lambda k: ratios[k][state]) for state in ("cold", warm)}
    print("lowest logitspec / pld: " + ", ".join(f"{state} {low[state]} {ratios[low[state]][state]:.3f}x"
                                               for state in ("cold", warm)))
    if args.json:
        Path(args.json).write_text(json.dumps(ratios, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
