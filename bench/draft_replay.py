"""Replay drafters on recorded greedy answers: mean accepted tokens per step (MAT) without the model.

Greedy decoding is deterministic, so once a question's answer and, for every answer token, the
top-k of the logit it came from are recorded, any drafter can be replayed on it: each step the
drafter proposes a tree from the tokens so far, the tree is cut to the tree capacity by the
engine's own acceptance statistics (decoding/cost_model.py, as with cost-aware sizing off), and the
longest path that agrees with the recorded answer is accepted plus the bonus token. That is what
the engine does, minus the forwards, so drafting ideas are compared in seconds instead of an hour.
The real bench (`logitspec bench`) stays the measurement; this is the workbench. What it cannot
replay: LogitSpec's echoes (they come from the model's logits at rejected tree nodes, which a
recording of the answer does not hold), so it replays LogitSpec without them.

    python bench/draft_replay.py record --per-category 3 --max-new-tokens 256 --out /tmp/replay.json
    python bench/draft_replay.py replay /tmp/replay.json --methods pld,logitspec
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding.cost_model import AcceptanceStats, ranked_nodes  # noqa: E402
from decoding.drafters import make_drafter  # noqa: E402
from decoding.specbench import DEFAULT_DATA, read_questions  # noqa: E402
from retrieval.suffix_index import SuffixIndex  # noqa: E402

TOP_K = 64  # guesses recorded per answer token (a drafter may use fewer)


def record(args) -> int:
    import torch

    from decoding.config import EngineConfig
    from decoding.engine import Engine
    from decoding.model import SeqBatchEntry
    from decoding.verify import SamplingParams

    engine = Engine(EngineConfig(method="logitspec", adaptive=False, max_context=4096))
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
            top = logits.topk(TOP_K).indices.tolist()  # top[i]: logit that produced answer[i]
            turns_out.append({"category": q["category"], "prompt": prompt, "answer": answer, "top": top})
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


def replay_turn(drafter, stats: AcceptanceStats, turn: dict, capacity: int) -> tuple[int, int]:
    prompt, answer, top = turn["prompt"], turn["answer"], turn["top"]
    index = SuffixIndex(prompt)
    i, steps, hot = 0, 0, False
    while i < len(answer):
        x0 = answer[i]
        tree = drafter.propose(index, x0, top[i][:drafter.guesses + 1] if drafter.guesses else [])
        if hot:
            tree.kinds = [k and k.heated() for k in tree.kinds]
        if len(tree) > capacity:
            order = ranked_nodes(tree, stats.node_probs(tree))
            tree = tree.subtree([0] + order[:capacity - 1])
        path = accepted_path(tree, answer, i)
        if len(tree) > 1:
            stats.record(tree, path)
        steps += 1
        index.extend(answer[i:i + len(path)])
        i += len(path)
        hot = len(path) > 1
    return len(answer), steps


def replay(args) -> int:
    data = json.loads(Path(args.file).read_text())
    rows = defaultdict(dict)
    for method in args.methods.split(","):
        drafter = make_drafter(method)
        stats = AcceptanceStats()
        tally = defaultdict(lambda: [0, 0])
        t0 = time.perf_counter()
        for turn in data["turns"]:
            tokens, steps = replay_turn(drafter, stats, turn, args.capacity)
            for key in (turn["category"], "overall"):
                tally[key][0] += tokens
                tally[key][1] += steps
        for key, (tokens, steps) in tally.items():
            rows[key][method] = tokens / steps
        print(f"[replay] {method}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    methods = args.methods.split(",")
    print(f"{'category':<16}" + "".join(f"{m:>12}" for m in methods))
    for key, mats in rows.items():
        print(f"{key:<16}" + "".join(f"{mats[m]:>12.2f}" for m in methods))
    if "pld" in methods:
        for m in methods:
            print(f"{m} / pld overall: {rows['overall'][m] / rows['overall']['pld']:.3f}")
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
    args = ap.parse_args()
    return record(args) if args.command == "record" else replay(args)


if __name__ == "__main__":
    sys.exit(main())
