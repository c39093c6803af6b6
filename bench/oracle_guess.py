"""How far can next-next guessing take LogitSpec on this model? An upper bound, by counting.

LogitSpec's guess branches bet that the token after the next one is among the top-k of the last
logit. This script replaces that bet with the truth: an oracle drafter that knows the greedy
answer puts the real next-next token first among the guesses (its retrieval branch hangs under it
as usual), on top of everything the real drafter proposes. No real guesser can do better than
that oracle, so its mean accepted tokens per step (MAT) bounds what any guess quality could give.
Fixed trees (no cost-aware sizing), greedy, Spec-Bench first turns. MAT is a count, so the figures
do not depend on the machine's speed or load.

    python bench/oracle_guess.py --per-category 1 --max-new-tokens 192
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding.config import EngineConfig  # noqa: E402
from decoding.drafters import LogitSpecDrafter  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.loader import load  # noqa: E402
from decoding.specbench import DEFAULT_DATA, read_questions  # noqa: E402
from decoding.verify import SamplingParams  # noqa: E402


class OracleGuessDrafter(LogitSpecDrafter):
    """LogitSpec with the true next-next token as the first guess (needs the reference answer)."""

    name = "oracle"

    def __init__(self):
        super().__init__()
        self.prompt_len = 0
        self.reference: list[int] = []
        self.covered = [0, 0]  # steps where the true next-next token was among the real guesses, steps

    def propose(self, index, x0, guesses, echoes=(), top=()):
        i = len(index.tokens) - self.prompt_len  # x0 is output token i
        if i + 1 < len(self.reference):
            y = self.reference[i + 1]
            real = [t for t in guesses if t != x0]
            self.covered[0] += y in real
            self.covered[1] += 1
            guesses = [y] + [t for t in real if t != y]
        return super().propose(index, x0, guesses, echoes, top)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--tree-capacity", type=int, default=64)
    args = ap.parse_args()
    loaded = load(None)
    base = EngineConfig(adaptive=False, tree_capacity=args.tree_capacity, max_context=2048)
    engines = {"pld": Engine(replace(base, method="pld"), loaded=loaded)}
    model = engines["pld"].model
    engines["logitspec"] = Engine(replace(base, method="logitspec"), loaded=loaded, model=model)
    engines["oracle"] = Engine(replace(base, method="logitspec"), loaded=loaded, model=model)
    oracle = OracleGuessDrafter()
    engines["oracle"].drafter = oracle
    tally = {m: [0, 0] for m in engines}  # tokens, steps
    questions = read_questions(DEFAULT_DATA, args.per_category)
    for n, q in enumerate(questions, 1):
        prompt = engines["pld"].chat_prompt([{"role": "user", "content": q["turns"][0]}])
        outputs = {}
        for m, engine in engines.items():
            if m == "oracle":
                oracle.prompt_len, oracle.reference = len(prompt), outputs["pld"]
            seq = engine.generate(prompt, SamplingParams(), args.max_new_tokens)
            outputs[m] = seq.output
            tally[m][0] += len(seq.output)
            tally[m][1] += seq.steps
        if len({tuple(o) for o in outputs.values()}) != 1:
            print(f"\n{q['category']}: outputs differ between methods", file=sys.stderr)
        mats = " ".join(f"{m} {t / s:.2f}" for m, (t, s) in tally.items())
        print(f"\r[oracle] {n}/{len(questions)} questions, MAT so far: {mats}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    mat = {m: t / s for m, (t, s) in tally.items()}
    print(f"questions {len(questions)}, {args.max_new_tokens} new tokens, fixed trees of {args.tree_capacity} nodes")
    for m in engines:
        print(f"MAT {m:9s} {mat[m]:.2f}  ({mat[m] / mat['pld']:.2f}x pld)")
    c, s = oracle.covered
    print(f"true next-next token among the real top-{oracle.guesses} guesses: {c}/{s} steps ({c / max(s, 1):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
