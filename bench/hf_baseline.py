"""Our engine against transformers' own `generate` on the same prompts, in one run.

Prompts: the first Spec-Bench question of writing, coding, math_reasoning, summarization, rag,
translation, qa and extraction (the set DEVELOPERS.md quotes for peers), chat template, greedy,
128 new tokens. transformers runs the same converted weights (fp32, eager), with and without its
prompt-lookup decoding; our engine runs ar, pld and logitspec.

    python bench/hf_baseline.py [--max-new-tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.loader import load  # noqa: E402
from decoding.specbench import DEFAULT_DATA, read_questions  # noqa: E402
from decoding.verify import SamplingParams  # noqa: E402

CATEGORIES = ("writing", "coding", "math_reasoning", "summarization", "rag", "translation", "qa", "extraction")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    first = {}
    for q in read_questions(DEFAULT_DATA):
        first.setdefault(q["category"], q)
    loaded = load(None)
    engines, model = {}, None
    for m in ("ar", "pld", "logitspec"):
        engines[m] = Engine(EngineConfig(method=m), loaded=loaded, model=model)
        model = engines[m].model
    prompts = [engines["ar"].chat_prompt([{"role": "user", "content": first[c]["turns"][0]}]) for c in CATEGORIES]

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(loaded.folder, dtype=torch.float32).eval()
    eos = loaded.tokenizer.eos_token_id

    def hf_run(prompt, **kw):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=eos, **kw)
        toks = out[0, len(prompt):].tolist()
        return toks[:toks.index(eos)] if eos in toks else toks

    runners = {
        "transformers generate": lambda p: hf_run(p),
        "transformers prompt lookup": lambda p: hf_run(p, prompt_lookup_num_tokens=10),
        **{f"logitspec engine {m}": (lambda p, m=m: engines[m].generate(p, SamplingParams(), args.max_new_tokens).output)
           for m in engines},
    }
    totals = {name: [0, 0.0] for name in runners}
    outputs = {name: [] for name in runners}
    runners["transformers generate"](prompts[0][:16])  # warm-up
    for i, prompt in enumerate(prompts):
        for name, run in runners.items():  # interleaved: noise hits every runner alike
            t0 = time.perf_counter()
            out = run(prompt)
            totals[name][1] += time.perf_counter() - t0
            totals[name][0] += len(out)
            outputs[name].append(out)
        print(f"\r{i + 1}/{len(prompts)} prompts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"{len(prompts)} Spec-Bench prompts, {args.max_new_tokens} new tokens, greedy, fp32, "
          f"{torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}")
    ref = outputs["transformers generate"]
    for name, (tokens, seconds) in totals.items():
        same = sum(a == b for a, b in zip(outputs[name], ref))
        print(f"{name:<28} {tokens / seconds:6.1f} tok/s   ({tokens} tokens, {seconds:.1f} s, "
              f"{same}/{len(prompts)} outputs equal to transformers generate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
