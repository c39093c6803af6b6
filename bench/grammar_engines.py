"""Grammar engines compared on this machine and the default model's tokenizer: llguidance and
xgrammar, on the same JSON schemas. For each: compile time, and 20 random walks that pick any token
the mask allows (the end token with probability 0.3 where allowed) until the grammar ends; a walk
counts as valid when its text parses as JSON and matches the schema. Mask times are per token.

    pip install llguidance==1.9.1 xgrammar==0.2.8 jsonschema   # xgrammar only for this comparison
    python bench/grammar_engines.py            # the figures in docs/grammar_engines.txt
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decoding.loader import load  # noqa: E402

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
        "required": ["name", "age", "tags"], "additionalProperties": False},
    "enum_anyof_ref": {"type": "object", "properties": {
        "kind": {"enum": ["a", "b", "c"]}, "v": {"anyOf": [{"type": "number"}, {"type": "null"}, {"type": "boolean"}]},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2}},
        "required": ["kind", "v", "items"], "additionalProperties": False,
        "$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer"},
                                                             "label": {"type": "string", "maxLength": 8}},
                           "required": ["id", "label"], "additionalProperties": False}}},
}
WALKS = 20


def walk(fill, consume, vocab: int, eos: int, rng: random.Random, limit: int = 300):
    """Random tokens the mask allows until the end token; (ids, seconds per mask, error)."""
    out, times = [], []
    mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    for _ in range(limit):
        t0 = time.perf_counter()
        fill(mask)
        times.append(time.perf_counter() - t0)
        bits = np.unpackbits(mask.numpy().view(np.uint8), axis=-1, bitorder="little")[0, :vocab]
        allowed = np.flatnonzero(bits).tolist()
        if not allowed:
            return out, times, "empty mask"
        token = eos if eos in allowed and rng.random() < 0.3 else rng.choice(allowed)
        if not consume(token):
            return out, times, "refused its own token"
        if token == eos:
            return out, times, None
        out.append(token)
    return out, times, "no end"


def main() -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import xgrammar as xgr

    loaded = load(None)
    tok, vocab, eos = loaded.tokenizer, loaded.hf_config["vocab_size"], loaded.tokenizer.eos_token_id
    from importlib.metadata import version
    print(f"{loaded.name}, vocab {vocab}; llguidance {version('llguidance')}, xgrammar {version('xgrammar')}; "
          f"{WALKS} random walks per schema")
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t1 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
    t2 = time.perf_counter()
    print(f"tokenizer set-up: xgrammar {t1 - t0:.2f} s, llguidance {t2 - t1:.2f} s")
    print(f"{'engine':11s} {'schema':15s} {'compile ms':>10s} {'valid':>6s} {'mask median ms':>15s} {'p90':>7s} {'max':>7s}")
    for name, schema in SCHEMAS.items():
        for engine in ("xgrammar", "llguidance"):
            rng = random.Random(0)
            t0 = time.perf_counter()
            if engine == "xgrammar":
                compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
                llguidance.LLMatcher(lltok, grammar)  # llguidance compiles lazily: the first matcher pays
            compile_s = time.perf_counter() - t0
            valid, times, errors = 0, [], []
            for _ in range(WALKS):
                if engine == "xgrammar":
                    m = xgr.GrammarMatcher(compiled)
                    fill, consume = m.fill_next_token_bitmask, m.accept_token
                else:
                    m = llguidance.LLMatcher(lltok, grammar)
                    fill, consume = (lambda mask, m=m: llguidance.torch.fill_next_token_bitmask(m, mask, 0)), m.consume_token
                ids, ts, error = walk(fill, consume, vocab, eos, rng)
                times += ts
                if error:
                    errors.append(error)
                    continue
                text = tok.decode(ids)
                try:
                    jsonschema.validate(json.loads(text), schema)
                    valid += 1
                except (ValueError, jsonschema.ValidationError) as e:
                    errors.append(f"{type(e).__name__}: {text!r}"[:160])
            times.sort()
            print(f"{engine:11s} {name:15s} {1e3 * compile_s:10.1f} {valid:3d}/{WALKS} {1e3 * statistics.median(times):15.3f} "
                  f"{1e3 * times[int(0.9 * len(times))]:7.3f} {1e3 * times[-1]:7.2f}")
            for e in errors:
                print(f"    invalid: {e}")


if __name__ == "__main__":
    main()
