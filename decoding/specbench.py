"""Spec-Bench harness: every method on the same questions, greedy, timed in one run.

Questions come in Spec-Bench's question.jsonl format (question_id, category, turns). Multi-turn
questions run as one conversation: each turn's prompt holds the earlier turns and that method's
own answers. The methods run each turn side by side, one decoding step at a time: the next step is
always the one of the method that has spent least time on the turn so far (prefill included), so
that while two methods are both decoding, the machine's slow and fast moments fall on both alike.
This VM's speed drifts by up to 1.5x within minutes; with whole turns run one method after another
(as before), three runs of the same code put logitspec at 1.075x, 1.116x and 1.070x pld overall
and moved a category's ratio by up to 0.4 from run to run. The prefills run in an order rotated
from turn to turn (turn_order), so that no method always starts first.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from decoding.config import EngineConfig
from decoding.engine import Engine, freeze_start_up_heap
from decoding.loader import load
from decoding.verify import SamplingParams

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "spec_bench" / "question.jsonl"


# The peer prompt set (DEVELOPERS.md): the first question of each of these categories.
PEER_CATEGORIES = ("writing", "coding", "math_reasoning", "summarization", "rag", "translation", "qa",
                   "extraction")


def first_turns(categories: tuple[str, ...] = PEER_CATEGORIES, path: Path = DEFAULT_DATA) -> list[str]:
    """The first turn of the first question of each category, in that order (PEER_CATEGORIES: the
    peer prompt set)."""
    first: dict[str, str] = {}
    for q in read_questions(path):
        first.setdefault(q["category"], q["turns"][0])
    return [first[c] for c in categories]


def read_questions(path: Path, per_category: int | None = None) -> list[dict]:
    questions, seen = [], defaultdict(int)
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        q = json.loads(line)
        if not isinstance(q.get("turns"), list) or "category" not in q:
            raise ValueError(f"{path}:{line_no}: a question needs 'category' and a list of 'turns'")
        if per_category is not None and seen[q["category"]] >= per_category:
            continue
        seen[q["category"]] += 1
        questions.append(q)
    return questions


@dataclass
class Tally:
    new_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0

    def add(self, new_tokens: int, steps: int, seconds: float) -> None:
        self.new_tokens += new_tokens
        self.steps += steps
        self.seconds += seconds

    def summary(self, ar: "Tally | None") -> dict:
        tps = self.new_tokens / self.seconds if self.seconds else 0.0
        ar_tps = ar.new_tokens / ar.seconds if ar and ar.seconds else 0.0
        return {
            "mat": round(self.new_tokens / self.steps, 3) if self.steps else 0.0,
            "tokens_per_s": round(tps, 2),
            "speedup": round(tps / ar_tps, 3) if ar_tps else None,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
        }


@dataclass
class BenchResult:
    model: str
    device: str
    max_new_tokens: int
    overall: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    categories: dict[str, dict[str, Tally]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Tally)))
    mismatches: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    split: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self, methods: list[str]) -> dict:
        out = {"model": self.model, "device": self.device, "max_new_tokens": self.max_new_tokens, "methods": {}}
        for m in methods:
            ar = self.overall.get("ar")
            out["methods"][m] = {
                "overall": self.overall[m].summary(ar),
                "categories": {c: t[m].summary(t.get("ar")) for c, t in self.categories.items()},
            }
            if m in self.split:
                out["methods"][m]["time_split"] = self.split[m]
        out["mismatches"] = {m: self.mismatches[m] for m in methods if m != "ar" and "ar" in methods}
        return out


def turn_order(methods: list[str], turn: int) -> list[str]:
    """The order the methods prefill in at the bench's `turn`-th turn (0-based), which also breaks
    ties in run_turn: rotated by one each turn, so over any len(methods) consecutive turns each
    method takes each place once."""
    k = turn % len(methods)
    return methods[k:] + methods[:k]


def run_turn(engines: dict[str, Engine], prompts: dict[str, list[int]], order: list[str],
             max_new_tokens: int) -> tuple[dict, dict[str, float]]:
    """One turn of every method, greedy, side by side (see the module docstring): prefills in
    `order`, then one decoding step at a time, always of the running method that has spent least
    time so far (ties: the earlier in `order`). Returns each method's finished sequence and its
    seconds (prefill and steps)."""
    greedy = SamplingParams()
    seqs, spent = {}, {}
    try:
        for m in order:
            t0 = time.perf_counter()
            seqs[m] = engines[m].start_sequence(prompts[m], greedy, max_new_tokens)
            spent[m] = time.perf_counter() - t0
        running = [m for m in order if not seqs[m].finished]
        while running:
            m = min(running, key=spent.__getitem__)
            t0 = time.perf_counter()
            engines[m].step([seqs[m]])
            spent[m] += time.perf_counter() - t0
            if seqs[m].finished:
                running.remove(m)
    finally:
        for m, seq in seqs.items():
            engines[m].stop_sequence(seq)
    for m, seq in seqs.items():
        if seq.error is not None:
            raise RuntimeError(f"{m}: generation failed: {seq.error}")
    return seqs, spent


def conversation(engines: dict[str, Engine], question: dict, first_turn: int,
                 max_new_tokens: int) -> Iterator[tuple[dict, dict[str, float]]]:
    """A question's turns, every engine side by side (run_turn), each engine holding its own
    answers in its history; `first_turn`: the bench's count of turns before this question (for
    turn_order). Yields what run_turn returns, turn by turn."""
    histories = {name: [] for name in engines}
    for i, text in enumerate(question["turns"]):
        prompts = {}
        for name, engine in engines.items():
            histories[name].append({"role": "user", "content": text})
            prompts[name] = engine.chat_prompt(histories[name])
        seqs, spent = run_turn(engines, prompts, turn_order(list(engines), first_turn + i), max_new_tokens)
        for name, seq in seqs.items():
            histories[name].append({"role": "assistant", "content": engines[name].tokenizer.decode(seq.output)})
        yield seqs, spent


def run_bench(data: Path, methods: list[str], per_category: int | None, max_new_tokens: int,
              base: EngineConfig, progress=sys.stderr) -> BenchResult:
    questions = read_questions(data, per_category)
    loaded = load(base.model)
    engines: dict[str, Engine] = {}
    shared_model = None
    for m in methods:
        engines[m] = Engine(replace(base, method=m), loaded=loaded, model=shared_model)
        shared_model = engines[m].model
    freeze_start_up_heap()
    first = engines[methods[0]]
    result = BenchResult(loaded.name, f"{first.device.type} {first.numerics}", max_new_tokens)
    total_turns = sum(len(q["turns"]) for q in questions)
    done, t_start = 0, time.perf_counter()
    for q in questions:
        for seqs, spent in conversation(engines, q, done, max_new_tokens):
            for m in methods:
                output = seqs[m].output
                for tally in result.overall[m], result.categories[q["category"]][m]:
                    tally.add(len(output), seqs[m].steps, spent[m])
                if m != "ar" and "ar" in methods and output != seqs["ar"].output:
                    result.mismatches[m] += 1
            done += 1
            line = " ".join(f"{m}={result.overall[m].summary(result.overall.get('ar'))['tokens_per_s']}"
                            for m in methods)
            print(f"\r[bench] {done}/{total_turns} turns, {time.perf_counter() - t_start:.0f}s, tok/s {line}",
                  end="", file=progress, flush=True)
    print(file=progress)
    for m, engine in engines.items():
        tm = engine.times
        total = tm.decode_total or 1.0
        result.split[m] = {"draft_pct": round(100 * tm.draft / total, 2), "mask_pct": round(100 * tm.mask / total, 2),
                           "forward_pct": round(100 * tm.forward / total, 2),
                           "verify_pct": round(100 * tm.verify / total, 2), "steps": tm.steps,
                           "tokens_per_forward": round(tm.tokens / max(tm.steps, 1), 2),
                           "ms_per_step": round(1000 * total / max(tm.steps, 1), 2)}
    return result


def format_table(report: dict) -> str:
    methods = list(report["methods"])
    cats = list(next(iter(report["methods"].values()))["categories"])
    lines = [f"model {report['model']} on {report['device']}, {report['max_new_tokens']} new tokens, greedy"]
    header = f"{'category':<16}" + "".join(f"{m + ' MAT':>14}{'tok/s':>8}{'speedup':>9}" for m in methods)
    lines.append(header)
    for name in cats + ["overall"]:
        row = f"{name:<16}"
        for m in methods:
            s = report["methods"][m]["overall"] if name == "overall" else report["methods"][m]["categories"][name]
            sp = f"{s['speedup']:.2f}x" if s["speedup"] is not None else "-"
            row += f"{s['mat']:>14.2f}{s['tokens_per_s']:>8.1f}{sp:>9}"
        lines.append(row)
    lines.append("outputs differing from ar: " + ", ".join(f"{m}={n}" for m, n in report["mismatches"].items()))
    for m in methods:
        split = report["methods"][m].get("time_split")
        if split:
            lines.append(f"{m} step time: draft {split['draft_pct']}%, masks {split['mask_pct']}%, "
                         f"forward {split['forward_pct']}%, verify {split['verify_pct']}% over {split['steps']} steps; "
                         f"{split['ms_per_step']} ms and {split['tokens_per_forward']} tokens verified per step")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in report["methods"] if m != "ar"]
    cats = list(report["methods"][methods[0]]["categories"]) + ["overall"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        data = report["methods"][m]
        rows = [data["categories"][c] if c != "overall" else data["overall"] for c in cats]
        xs = [j + i * width for j in range(len(cats))]
        axes[0].bar(xs, [r["speedup"] or 0 for r in rows], width, label=m)
        axes[1].bar(xs, [r["mat"] for r in rows], width, label=m)
    for ax, title in zip(axes, ["wall-clock speedup vs ar", "mean accepted tokens per step"]):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(cats))], cats, rotation=45, ha="right")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{report['model']} on {report['device']}, {report['max_new_tokens']} new tokens, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
