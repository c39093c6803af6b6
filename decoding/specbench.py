"""Spec-Bench harness: every method on the same questions, greedy, timed in one run.

Questions come in Spec-Bench's question.jsonl format (question_id, category, turns). Multi-turn
questions run as one conversation: each turn's prompt holds the earlier turns and that method's
own answers. Methods are interleaved per turn so that machine noise hits them alike, and their
order rotates from turn to turn (turn_order) so that no method always runs first or last: with a
fixed order, a run with pld last put logitspec / pld several percent below runs with logitspec last.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
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
    # Each method's turns by its place in the turn's order (0 = ran first). The rotation is fixed,
    # so a method's place k holds the same turns in every run: a place's figure mixes the place
    # with those turns' content (least for ar, whose speed depends little on content).
    places: dict[str, dict[int, Tally]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Tally)))

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
            if m in self.places:
                out["methods"][m]["by_place"] = {str(k): self.places[m][k].summary(None)
                                                 for k in sorted(self.places[m])}
        out["mismatches"] = {m: self.mismatches[m] for m in methods if m != "ar" and "ar" in methods}
        return out


def turn_order(methods: list[str], turn: int) -> list[str]:
    """The order the methods run in at the bench's `turn`-th turn (0-based): rotated by one each
    turn, so over any len(methods) consecutive turns each method takes each place once."""
    k = turn % len(methods)
    return methods[k:] + methods[:k]


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
    greedy = SamplingParams()
    total_turns = sum(len(q["turns"]) for q in questions)
    done, t_start = 0, time.perf_counter()
    for q in questions:
        histories = {m: [] for m in methods}
        for turn in q["turns"]:
            outputs = {}
            for place, m in enumerate(turn_order(methods, done)):
                engine = engines[m]
                histories[m].append({"role": "user", "content": turn})
                prompt = engine.chat_prompt(histories[m])
                t0 = time.perf_counter()
                seq = engine.generate(prompt, greedy, max_new_tokens)
                seconds = time.perf_counter() - t0
                outputs[m] = seq.output
                histories[m].append({"role": "assistant", "content": engine.tokenizer.decode(seq.output)})
                for tally in result.overall[m], result.categories[q["category"]][m], result.places[m][place]:
                    tally.add(len(seq.output), seq.steps, seconds)
            for m in methods:
                if m != "ar" and "ar" in outputs and outputs[m] != outputs["ar"]:
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
    for m in methods:
        by_place = report["methods"][m].get("by_place")
        if by_place and len(by_place) > 1:
            lines.append(f"{m} tok/s by place in the turn's order (1 = ran first): "
                         + ", ".join(f"{int(k) + 1}: {s['tokens_per_s']} ({s['new_tokens']} tokens)"
                                     for k, s in by_place.items()))
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
