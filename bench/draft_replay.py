"""Replay drafters on recorded greedy answers: MAT, or modelled tokens per second, without the model.

Greedy decoding is deterministic, so once a question's answer and, for every answer token, the
top-k of the logit it came from (tokens and probabilities) are recorded, any drafter can be
replayed on it: each step the drafter proposes a tree from the tokens so far, the tree is cut by
the engine's own acceptance statistics (decoding/cost_model.py), and the longest path that agrees
with the recorded answer is accepted plus the bonus token. That is what the engine does, minus the
forwards, so drafting ideas are compared in seconds instead of an hour.

Two cuts. By default, to the tree capacity (the engine with cost-aware sizing off): MAT. With
`--cost` and a calibration (start-up prints it), as the adaptive engine sizes a batch of one
(see Replay): the forwards priced by that calibration, and methods compared in modelled tokens
per second, next to an oracle that verifies exactly the path the uncut tree would accept (what
perfect ranking of the same candidates could reach). On the 63 Spec-Bench turns, priced by the
calibration of docs/bench_cpu_768399c.txt, it puts LogitSpec at 1.094x PLD, where four real runs
measured 1.080-1.106x (docs/replay_cost_aware.txt).

The real bench (`logitspec bench`) stays the measurement; this is the workbench. What it cannot
replay: LogitSpec's echoes (they come from the model's logits at rejected tree nodes, which a
recording of the answer does not hold), so it replays LogitSpec without them; nor the cost model's
learning and realised loop (the prices stay at the calibration).

    python bench/draft_replay.py record --per-category 3 --max-new-tokens 256 --out /tmp/replay.json
    python bench/draft_replay.py replay /tmp/replay.json --methods pld,logitspec
    python bench/draft_replay.py replay /tmp/replay.json --cost 1:34,4:42,8:49,16:66,32:97,64:163 \
        --methods pld,logitspec,logitspec --set recent=8
    python bench/draft_replay.py replay /tmp/replay.json --cost 1:34,4:42,8:49,16:66,32:97,64:163 \
        --fresh-statistics   # each category from a cold start, as a server just started
    python bench/draft_replay.py replay /tmp/replay.json --cost 1:34,4:42,8:49,16:66,32:97,64:163 \
        --restart-statistics   # each category after a restart, from the statistics the others taught
    python bench/draft_replay.py replay /tmp/replay.json --cost 1:13,4:15,8:19,16:30,32:55,64:126 \
        --corpus decoding/priors/SmolLM2-135M-Instruct.Q4_1.corpus.json   # LogitSpec as the engine runs it
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding.config import EngineConfig  # noqa: E402
from decoding.corpus import index_answers  # noqa: E402
from decoding.cost_model import AcceptanceStats, CostModel, ranked_nodes  # noqa: E402
from decoding.drafters import make_drafter, top_wanted  # noqa: E402
from decoding.engine import is_probe, is_stretch  # noqa: E402
from decoding.specbench import DEFAULT_DATA, read_questions  # noqa: E402
from decoding.tree import DraftTree  # noqa: E402
from retrieval.suffix_index import SuffixIndex  # noqa: E402

TOP_K = 64  # guesses recorded per answer token (a drafter may use fewer)
SEPARATOR = 2**62  # between turns in a shared index: beyond any vocabulary, so no match runs across it


def record(args) -> int:
    import torch

    from decoding.engine import Engine
    from decoding.model import SeqBatchEntry
    from decoding.verify import SamplingParams

    engine = Engine(EngineConfig(method="pld", max_context=4096))  # greedy: every method answers alike
    turns_out = []
    questions = read_questions(Path(args.data), args.per_category)
    total = sum(len(q["turns"]) for q in questions)
    t0 = time.perf_counter()
    for q in questions:
        history = []
        for turn in q["turns"]:
            history.append({"role": "user", "content": turn})
            prompt = engine.chat_prompt(history)
            answer = engine.generate(prompt, SamplingParams(), args.max_new_tokens).output
            history.append({"role": "assistant", "content": engine.tokenizer.decode(answer)})
            # One teacher-forced forward gives the logit behind every answer token.
            full = prompt + answer
            slot = engine.cache.allocate()
            try:
                with torch.inference_mode():
                    logits = engine.model.forward(torch.tensor(full), torch.arange(len(full)),
                                                  [SeqBatchEntry(slot, 0, len(full), None)], engine.cache,
                                                  torch.arange(len(prompt) - 1, len(full) - 1))
            finally:
                engine.cache.release(slot)
            top = logits.float().softmax(-1).topk(TOP_K)  # top[i]: logit that produced answer[i]
            turns_out.append({"category": q["category"], "prompt": prompt, "answer": answer,
                              "top": top.indices.tolist(),
                              "prob": [[round(p, 5) for p in row] for row in top.values.tolist()]})
            print(f"\r[record] {len(turns_out)}/{total} turns, {time.perf_counter() - t0:.0f}s", end="",
                  file=sys.stderr, flush=True)
    print(file=sys.stderr)
    Path(args.out).write_text(json.dumps({"max_new_tokens": args.max_new_tokens, "turns": turns_out}))
    return 0


def accepted_path(tree, answer: list[int], i: int) -> list[int]:
    """Nodes of the longest root path that the answer agrees with (x0 = answer[i] is the root)."""
    path, node, j = [0], 0, i + 1
    while j < len(answer):
        child = tree.children(node).get(answer[j])
        if child is None:
            break
        path.append(child)
        node, j = child, j + 1
    return path


class Replay:
    """One method's replay over a recording, step by step as the engine runs a sequence.

    Without a cost model: every tree is cut to `capacity` nodes by the acceptance statistics
    (the engine with cost-aware sizing off) and MAT is what it measures. With one (`--cost`): as
    Engine._schedule and Engine._draft run a batch of one, with the forwards priced by a fixed
    calibration instead of timed: probes (roots alone), a proposal skipped when no branch's
    likeliest first node could pay, the cut that CostModel.choose makes, a stretch probe every
    STRETCH_EVERY-th step; tokens per modelled second then compare methods as the real bench
    does (the realised loop, CostModel.settle, and the cost model's learning are left out: the
    prices do not move)."""

    def __init__(self, method: str, capacity: int, calibration: dict[int, float] | None, drafter_options: dict,
                 shared_index: bool = False, margin: float = 0.0, corpus: SuffixIndex | None = None):
        self.drafter = make_drafter(method)
        if corpus is not None and hasattr(self.drafter, "corpus"):  # logitspec's, as the engine gives it
            self.drafter.corpus = corpus
        for name, value in drafter_options.items():
            if not hasattr(self.drafter, name):
                raise SystemExit(f"{method} has no parameter {name!r}")
            setattr(self.drafter, name, type(getattr(self.drafter, name))(value))
        self.stats = AcceptanceStats()
        self.capacity = capacity
        self.cost = CostModel(calibration, capacity, margin=margin) if calibration else None
        self.steps_run = 0
        self.probes = 0
        # shared_index: each turn's index also holds every earlier turn's prompt and answer (one
        # index across sessions, as a server could keep), each behind a separator no text contains
        self.shared_index = shared_index
        self.history: list[int] = []

    def _top(self, top: list[int]) -> tuple[list[int], list[int]]:
        """The recorded top tokens a drafter takes (Engine._top), and the guesses among them."""
        k = top_wanted(self.drafter)
        top = top[:k + 1] if k else []
        return top[:self.drafter.guesses + 1] if self.drafter.guesses else [], top

    def _tree(self, index: SuffixIndex, x0: int, guesses: list[int], hot: bool, top: list[int]) -> DraftTree:
        drafter, stats, cost = self.drafter, self.stats, self.cost
        stretch = False
        if cost is None:
            tree = drafter.propose(index, x0, guesses, top=top)
        else:
            self.steps_run += 1
            if is_probe(self.steps_run, self.probes):
                self.probes += 1
                return DraftTree.root(x0)
            stretch = is_stretch(self.steps_run)  # as Engine._schedule: one flag for the gate and the cut
            floor = cost.break_even(1)
            paying = stats.paying(drafter.openings(index, x0), floor, hot)
            if not paying and not stretch:
                return DraftTree.root(x0)
            tree = drafter.propose(index, x0, guesses if "guess" in paying else [], top=top)
        if hot:
            tree.kinds = [k and k.heated() for k in tree.kinds]
        probs = stats.node_probs(tree)
        order = ranked_nodes(tree, probs)
        if cost is not None:
            keep = cost.choose([[probs[j] for j in order]], [self.capacity - 1], stretch)[0]
        else:
            keep = self.capacity - 1
        return tree.subtree([0] + order[:keep]) if keep < len(order) else tree

    def turn(self, turn: dict) -> tuple[int, int, int, float, float]:
        """Tokens, steps, tokens verified, modelled seconds (0 without a cost model), and the
        modelled seconds of the oracle that verifies exactly the path the uncut tree accepts."""
        prompt, answer, top = turn["prompt"], turn["answer"], turn["top"]
        earlier = self.history
        if self.shared_index:
            self.history = earlier + prompt + [SEPARATOR] + answer + [SEPARATOR]
        index = SuffixIndex(earlier + prompt)
        i, steps, verified, seconds, oracle, hot = 0, 0, 0, 0.0, 0.0, False
        while i < len(answer):
            x0 = answer[i]
            guesses, top_i = self._top(top[i])
            tree = self._tree(index, x0, guesses, hot, top_i)
            path = accepted_path(tree, answer, i)
            if len(tree) > 1:
                self.stats.record(tree, path)
            steps += 1
            verified += len(tree)
            if self.cost is not None:
                seconds += self.cost.cost(len(tree))
            index.extend(answer[i:i + len(path)])
            i += len(path)
            hot = len(path) > 1
        if self.cost is not None:  # the oracle, on a fresh index: what perfect ranking could reach
            index, i = SuffixIndex(earlier + prompt), 0
            while i < len(answer):
                x0 = answer[i]
                guesses, top_i = self._top(top[i])
                n = len(accepted_path(self.drafter.propose(index, x0, guesses, top=top_i), answer, i))
                oracle += self.cost.cost(n)
                index.extend(answer[i:i + n])
                i += n
        return len(answer), steps, verified, seconds, oracle


def questions(turns: list[dict]) -> list[list[dict]]:
    """The recording's turns grouped by question: a follow-up turn's prompt begins with the turn
    before it (prompt, answer, then the next question)."""
    groups: list[list[dict]] = []
    for turn in turns:
        before = groups[-1][-1] if groups else None
        if before is not None and turn["prompt"][:len(before["prompt"])] == before["prompt"] \
                and turn["category"] == before["category"]:
            groups[-1].append(turn)
        else:
            groups.append([turn])
    return groups


def replay(args) -> int:
    data = json.loads(Path(args.file).read_text())
    calibration = ({int(n): float(ms) / 1000 for n, ms in (p.split(":") for p in args.cost.split(","))}
                   if args.cost else None)
    options = dict(p.split("=") for p in args.set.split(",")) if args.set else {}
    turns = data["turns"]
    if args.shared_index and args.order.split(":")[0] in ("reverse", "shuffle"):
        # a later turn's prompt holds the earlier turns' answers: replayed first, it would put them
        # in the shared index before they are generated
        raise SystemExit("--shared-index keeps each question's turns in order: use --order bench or questions:SEED")
    if args.order == "reverse":
        turns = turns[::-1]
    elif args.order.startswith("shuffle:"):
        turns = list(turns)
        random.Random(int(args.order.split(":")[1])).shuffle(turns)
    elif args.order.startswith("questions:"):
        groups = questions(turns)
        random.Random(int(args.order.split(":")[1])).shuffle(groups)
        turns = [turn for group in groups for turn in group]
    elif args.order != "bench":
        raise SystemExit(f"--order: bench, reverse, shuffle:SEED or questions:SEED, not {args.order!r}")
    per_category = args.fresh_statistics or args.restart_statistics
    if args.fresh_statistics and args.restart_statistics:
        raise SystemExit("--fresh-statistics or --restart-statistics: a category starts from one or the other")
    if per_category:
        if args.shared_index:
            raise SystemExit("--fresh-statistics and --restart-statistics replay each category alone: "
                             "there are no earlier sessions to share")
        rank = {c: i for i, c in enumerate(dict.fromkeys(t["category"] for t in turns))}  # first appearance
        turns = sorted(turns, key=lambda t: rank[t["category"]])  # stable: each category's turns in order
    corpus = index_answers(json.loads(Path(args.corpus).read_text())["answers"]) if args.corpus else None
    methods = args.methods.split(",")
    options_label = ",".join(([args.set] if args.set else []) + (["shared index"] if args.shared_index else []))
    labels = methods[:-1] + [methods[-1] + (f"[{options_label}]" if options_label else "")]
    rows = defaultdict(dict)
    for j, (method, label) in enumerate(zip(methods, labels)):
        last = j == len(methods) - 1
        run, category = None, None
        tally = defaultdict(lambda: [0, 0, 0, 0.0, 0.0])
        t0 = time.perf_counter()
        for turn in turns:
            if run is None or (per_category and turn["category"] != category):
                run = Replay(method, args.capacity, calibration, options if last else {},
                             args.shared_index and last, args.margin, corpus)
                category = turn["category"]
                if args.restart_statistics:
                    # what a server that served the other categories saved, read back by a new one
                    # (decoding/statistics_cache.py): the statistics through their file format
                    earlier = Replay(method, args.capacity, calibration, options if last else {}, False, args.margin,
                                     corpus)
                    for other in turns:
                        if other["category"] != category:
                            earlier.turn(other)
                    run.stats.restore(json.loads(json.dumps(earlier.stats.state())))
            done = run.turn(turn)
            for key in (turn["category"], "overall"):
                tally[key] = [a + b for a, b in zip(tally[key], done)]
        for key, (tokens, steps, _, seconds, _) in tally.items():
            rows[key][label] = tokens / seconds if calibration else tokens / steps
        tokens, steps, verified, seconds, oracle = tally["overall"]
        print(f"[replay] {label}: MAT {tokens / steps:.3f}, {verified / steps:.2f} tokens verified a step"
              + (f", {tokens / seconds:.1f} tok/s modelled (oracle {tokens / oracle:.1f})" if calibration else "")
              + f"; {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    what = "modelled tok/s" if calibration else "MAT"
    width = max(12, *(len(m) + 2 for m in labels))
    print(f"{what}\n{'category':<16}" + "".join(f"{m:>{width}}" for m in labels))
    for key in [k for k in rows if k != "overall"] + ["overall"]:
        print(f"{key:<16}" + "".join(f"{rows[key][m]:>{width}.2f}" for m in labels))
    if "pld" in labels:
        categories = [k for k in rows if k != "overall"]
        for m in labels:
            ratio = {k: rows[k][m] / rows[k]["pld"] for k in categories}
            low = min(categories, key=ratio.get)
            print(f"{m} / pld overall: {rows['overall'][m] / rows['overall']['pld']:.3f}, lowest {low} "
                  f"{ratio[low]:.3f}, mean of categories {sum(ratio.values()) / len(ratio):.3f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="generate greedy answers and the top-k behind each token")
    rec.add_argument("--data", default=str(DEFAULT_DATA))
    rec.add_argument("--per-category", type=int, default=3)
    rec.add_argument("--max-new-tokens", type=int, default=256)
    rec.add_argument("--out", required=True)
    rep = sub.add_parser("replay", help="replay drafters on a recording")
    rep.add_argument("file")
    rep.add_argument("--methods", default="pld,logitspec")
    rep.add_argument("--capacity", type=int, default=64, help="tree capacity, root included")
    rep.add_argument("--cost", default="", metavar="N:MS,...",
                     help="size trees as the engine does, by a cost model with this calibration (start-up "
                          "prints it, e.g. 1:34,4:42,8:49,16:66,32:97,64:163), and compare modelled tokens "
                          "per second")
    rep.add_argument("--margin", type=float, default=EngineConfig().draft_margin,
                     help="with --cost: how much more than plain decoding a draft must promise (the engine's "
                          "--draft-margin; default its default)")
    rep.add_argument("--order", default="bench", help="bench (the recording's: category after category), "
                     "reverse, shuffle:SEED (traffic that mixes categories; the statistics learn in order), "
                     "or questions:SEED (questions shuffled, each one's turns in order)")
    rep.add_argument("--set", default="", metavar="NAME=VALUE,...",
                     help="drafter parameters for the last method (e.g. recent=8,next_tokens=24); repeat a "
                          "method to compare: --methods pld,logitspec,logitspec --set recent=8")
    rep.add_argument("--shared-index", action="store_true",
                     help="the last method's index also holds every earlier turn's prompt and answer (one "
                          "index across sessions); repeat a method to compare: --methods pld,pld --shared-index")
    rep.add_argument("--corpus", default="", metavar="FILE",
                     help="LogitSpec also retrieves from this corpus (decoding/priors/<model>.corpus.json), as the "
                          "engine does from the one shipped for its model")
    rep.add_argument("--fresh-statistics", action="store_true",
                     help="replay each category alone from empty acceptance statistics, as a server just "
                          "started would serve it (a cold start), instead of one run that learns throughout")
    rep.add_argument("--restart-statistics", action="store_true",
                     help="replay each category alone from the acceptance statistics that the other "
                          "categories' turns taught, as a restarted server that kept them would serve it")
    args = ap.parse_args()
    return record(args) if args.command == "record" else replay(args)


if __name__ == "__main__":
    sys.exit(main())
