"""JSON benchmark: Spec-Bench extraction and rag questions answered into one JSON schema, with the
grammar on, for `ar`, `pld` and `logitspec`, interleaved per question in one run (greedy).

Reports per category and overall: MAT (tokens per step), tokens/s, speedup over constrained `ar`,
the grammar's cost per step (pruning, forced tokens and per-node masks, decoding/grammar.py) and
its share of the decoding time, whether every method's output equals `ar`'s, and how many answers
are complete JSON that matches the schema.

    python bench/json_bench.py [--per-category 5] [--max-new-tokens 256] [--json docs/json_bench.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.grammar import json_schema_grammar  # noqa: E402
from decoding.loader import load  # noqa: E402
from decoding.specbench import DEFAULT_DATA, read_questions  # noqa: E402
from decoding.verify import SamplingParams  # noqa: E402

METHODS = ("ar", "pld", "logitspec")
CATEGORIES = ("extraction", "rag")
# Quotes and entities copy the input (what retrieval drafts), the entities repeat one structure
# (what the grammar forces); lengths are bounded so that a small model's answer ends.
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 300},
        "quotes": {"type": "array", "items": {"type": "string", "maxLength": 200}, "maxItems": 3},
        "entities": {"type": "array", "maxItems": 6, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 60},
                           "type": {"enum": ["person", "place", "organisation", "date", "number", "other"]}},
            "required": ["name", "type"], "additionalProperties": False}},
    },
    "required": ["answer", "quotes", "entities"],
    "additionalProperties": False,
}
INSTRUCTION = ("\n\nAnswer as JSON: the answer, up to 3 quotes from the text that support it, and the entities "
               "it mentions.")


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):  # cut by the token limit, or (never) off the schema
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--per-category", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    questions = [q for q in read_questions(args.data) if q["category"] in CATEGORIES]
    picked, seen = [], defaultdict(int)
    for q in questions:
        if seen[q["category"]] < args.per_category:
            seen[q["category"]] += 1
            picked.append(q)
    loaded = load(None)
    engines, model = {}, None
    for m in METHODS:
        engines[m] = Engine(EngineConfig(method=m), loaded=loaded, model=model)
        model = engines[m].model
    grammar = json_schema_grammar(SCHEMA)
    tally = {c: {m: [0, 0, 0.0] for m in METHODS} for c in (*CATEGORIES, "overall")}  # tokens, steps, seconds
    differ, complete = defaultdict(int), defaultdict(int)
    t_start = time.perf_counter()
    for n, q in enumerate(picked, 1):
        outputs = {}
        for m in METHODS:
            e = engines[m]
            prompt = e.chat_prompt([{"role": "user", "content": q["turns"][0] + INSTRUCTION}])
            t0 = time.perf_counter()
            seq = e.generate(prompt, SamplingParams(), args.max_new_tokens, constraint=e.grammars.constraint(grammar))
            seconds = time.perf_counter() - t0
            outputs[m] = seq.output
            complete[m] += valid(e.tokenizer.decode(seq.output))
            for c in (q["category"], "overall"):
                t = tally[c][m]
                t[0] += len(seq.output)
                t[1] += seq.steps
                t[2] += seconds
        for m in METHODS[1:]:
            differ[m] += outputs[m] != outputs["ar"]
        print(f"\r[json bench] {n}/{len(picked)} questions, {time.perf_counter() - t_start:.0f}s", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)

    report = {"model": loaded.name, "max_new_tokens": args.max_new_tokens, "questions": len(picked),
              "schema": SCHEMA, "categories": {}, "differing_from_ar": dict(differ), "complete_json": dict(complete),
              "grammar": {}}
    for c, per in tally.items():
        ar_tps = per["ar"][0] / per["ar"][2]
        report["categories"][c] = {m: {"mat": round(tok / steps, 3), "tokens_per_s": round(tok / s, 2),
                                       "speedup": round(tok / s / ar_tps, 3), "new_tokens": tok, "steps": steps}
                                   for m, (tok, steps, s) in per.items()}
    for m, e in engines.items():
        tm = e.times
        report["grammar"][m] = {"ms_per_step": round(1e3 * tm.grammar / max(tm.steps, 1), 3),
                                "share_of_decoding": round(tm.grammar / max(tm.decode_total, 1e-9), 4),
                                "steps": tm.steps}
    lines = [f"model {loaded.name}, {len(picked)} Spec-Bench questions ({', '.join(CATEGORIES)}), "
             f"{args.max_new_tokens} new tokens, greedy, JSON schema enforced"]
    lines.append(f"{'category':<12}" + "".join(f"{m + ' MAT':>14}{'tok/s':>8}{'speedup':>9}" for m in METHODS))
    for c in (*CATEGORIES, "overall"):
        lines.append(f"{c:<12}" + "".join(f"{r['mat']:>14.2f}{r['tokens_per_s']:>8.1f}{r['speedup']:>8.2f}x"
                                          for r in report["categories"][c].values()))
    lines.append("grammar per step: " + ", ".join(
        f"{m} {g['ms_per_step']:.2f} ms ({100 * g['share_of_decoding']:.1f}% of decoding)" for m, g in report["grammar"].items()))
    lines.append(f"outputs differing from ar: {', '.join(f'{m}={differ[m]}' for m in METHODS[1:])}; complete valid "
                 f"JSON: {', '.join(f'{m}={complete[m]}/{len(picked)}' for m in METHODS)}")
    print("\n".join(lines))
    if args.json:
        report["table"] = lines
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
