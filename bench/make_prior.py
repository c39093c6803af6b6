"""Write what ships for a model (decoding/priors/): LogitSpec's corpus and the acceptance statistics.

First the corpus (decoding/corpus.py): the model's greedy answers to every question of
bench/corpus_prompts.jsonl, each asked alone, CORPUS_BATCH at a time with plain decoding. Then the
prior (decoding/statistics_cache.py), which a process with no saved statistics starts from instead
of from none: one engine, from no statistics and with that corpus, answers every question of
bench/prior_prompts.jsonl with logitspec and then with pld, turn by turn, greedy, as a server
would, and its statistics are written where the engine looks for them. Both question files were
written for this, in Spec-Bench's categories but none of its questions, and share none: the
benchmarks never measure text either learned from, and the prior measures the corpus's drafts on
text the corpus does not hold. Run it again when node kinds change (statistics_cache.FORMAT), and
commit both files.

    python bench/make_prior.py                     # the embedded default model
    python bench/make_prior.py --model path/to/model.gguf --out /tmp/prior.json --corpus-out /tmp/corpus.json
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

from decoding import corpus, statistics_cache  # noqa: E402
from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.specbench import read_questions  # noqa: E402
from decoding.verify import SamplingParams  # noqa: E402

PROMPTS = ROOT / "bench" / "prior_prompts.jsonl"
CORPUS_PROMPTS = ROOT / "bench" / "corpus_prompts.jsonl"
CORPUS_BATCH = 8  # questions decoded together for the corpus (plain decoding: the same greedy answers)
METHODS = ("logitspec", "pld")  # the methods that draft; each teaches its own node kinds


def answer_alone(engine: Engine, questions: list[dict], max_new_tokens: int) -> list[list[int]]:
    """Every turn of every question asked alone, greedy, CORPUS_BATCH at a time: the answers'
    tokens, in the questions' order."""
    todo = [engine.chat_prompt([{"role": "user", "content": text}]) for q in questions for text in q["turns"]]
    answers: list[list[int] | None] = [None] * len(todo)
    running: list = []  # (question number, sequence)
    t0, next_up = time.perf_counter(), 0
    try:
        while next_up < len(todo) or running:
            while next_up < len(todo) and len(running) < CORPUS_BATCH:
                running.append((next_up, engine.start_sequence(todo[next_up], SamplingParams(), max_new_tokens)))
                next_up += 1
            engine.step([seq for _, seq in running])
            for i, seq in [r for r in running if r[1].finished]:
                if seq.error is not None:
                    raise RuntimeError(f"generation failed: {seq.error}")
                engine.stop_sequence(seq)
                answers[i] = seq.output
                running.remove((i, seq))
                done = sum(a is not None for a in answers)
                print(f"\r[corpus] {done}/{len(todo)} answers, {sum(len(a) for a in answers if a)} tokens, "
                      f"{time.perf_counter() - t0:.0f}s", end="", file=sys.stderr, flush=True)
    finally:
        for _, seq in running:
            engine.stop_sequence(seq)
    print(file=sys.stderr)
    return answers


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
    ap.add_argument("--corpus-prompts", default=str(CORPUS_PROMPTS))
    ap.add_argument("--corpus-out", default=None,
                    help="where to write the corpus (default: decoding/priors/<model>.corpus.json)")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    writer = Engine(EngineConfig(model=args.model, method="ar", max_batch=CORPUS_BATCH, max_context=4096,
                                 prior_statistics=False, corpus=False))
    asked = read_questions(Path(args.corpus_prompts))
    answers = answer_alone(writer, asked, args.max_new_tokens)
    source = (f"bench/make_prior.py: {len(answers)} questions of {Path(args.corpus_prompts).name}, each alone, "
              f"{args.max_new_tokens} new tokens, greedy; {date.today()}, at {commit}")
    path = corpus.write_corpus(writer.loaded, answers, source, Path(args.corpus_out) if args.corpus_out else None)
    print(f"[corpus] {len(answers)} answers ({sum(map(len, answers))} tokens) written to {path}", file=sys.stderr)
    del writer
    engine = Engine(EngineConfig(model=args.model, max_context=4096, prior_statistics=False, corpus=False))
    engine.drafters["logitspec"].corpus = corpus.index_answers(answers)
    questions = read_questions(Path(args.prompts))
    turns = teach(engine, questions, args.max_new_tokens)
    source = (f"bench/make_prior.py: {len(questions)} questions of {Path(args.prompts).name} ({turns} answers, "
              f"{', '.join(METHODS)}), {args.max_new_tokens} new tokens, greedy; {date.today()}, at {commit}")
    path = statistics_cache.write_prior(engine.loaded, engine.stats.state(), source,
                                        Path(args.out) if args.out else None)
    print(f"[prior] {len(engine.stats.kinds)} node kinds written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
