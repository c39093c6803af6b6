"""Our engine against its CPU peers on the same prompts, in one run, methods interleaved.

Peers: llama.cpp (llama-cpp-python on the same GGUF file, same threads; plain, and with its
prompt-lookup decoding of 10 tokens) and transformers `generate` (the same dequantized fp32
weights, eager; plain and with prompt lookup). Ours: ar, pld and logitspec.

Prompts: the first Spec-Bench question of writing, coding, math_reasoning, summarization, rag,
translation, qa and extraction (the set DEVELOPERS.md quotes for peers), chat template, greedy.
Every system gets the same prompt token ids and stops at the model's end of turn. Times include
each request's prefill. A peer that is not installed is left out with a line saying so; install
them with `pip install -e '.[peers]'` (llama-cpp-python compiles llama.cpp: about 13 minutes on
2 cores).

    python bench/peers.py [--max-new-tokens 128] [--threads 2] [--dtype auto,gguf] [--json out.json]

--dtype takes our engine's numerics, several separated by commas: each gets its ar, pld and
logitspec. It prints one table: tokens/s, the ratio to llama.cpp plain and to our first ar, and
how many outputs equal a reference token for token: our ar at the same numerics for our methods,
our gguf ar (the same weights) or else our first ar for llama.cpp, our float32 ar for transformers.
Outputs at other numerics may differ where two tokens are nearly tied.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding.calibration_cache import processor_name  # noqa: E402
from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.loader import default_model_path, load  # noqa: E402
from decoding.specbench import PEER_CATEGORIES, first_turns  # noqa: E402
from decoding.verify import SamplingParams  # noqa: E402


def llama_cpp_runners(gguf: Path, threads: int, max_new: int, stops: set[int]) -> dict:
    """llama.cpp plain and with prompt lookup, or {} (with a line on stderr) when not installed."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        print("llama-cpp-python is not installed (pip install -e '.[peers]'): llama.cpp left out", file=sys.stderr)
        return {}
    common = dict(model_path=str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False,
                  seed=0)
    plain = Llama(**common)
    # Speculative decoding in llama-cpp-python verifies drafts against every position's logits.
    lookup = Llama(**common, logits_all=True, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))

    def run(llm, prompt: list[int]) -> list[int]:
        llm.reset()  # no prompt cache across requests: every system prefills every prompt
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                  reset=True):
            if token in stops:
                break
            out.append(token)
            if len(out) >= max_new:
                break
        return out

    return {"llama.cpp plain": lambda p: run(plain, p), "llama.cpp prompt lookup": lambda p: run(lookup, p)}


def transformers_runners(folder: Path, max_new: int, eos: int) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def run(prompt: list[int], **kw) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos, **kw)
        toks = out[0, len(prompt):].tolist()
        return toks[:toks.index(eos)] if eos in toks else toks

    return {"transformers generate": lambda p: run(p),
            "transformers prompt lookup": lambda p: run(p, prompt_lookup_num_tokens=10)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="our engine's --dtype; several separated by commas")
    ap.add_argument("--no-transformers", action="store_true", help="leave transformers out (it is slow)")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(None)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    engines: dict[str, Engine] = {}  # "ours <dtype> <method>"
    for dtype in dtypes:
        model = None
        for m in ("ar", "pld", "logitspec"):
            engine = Engine(EngineConfig(method=m, dtype=dtype, threads=args.threads), loaded=loaded, model=model)
            engines[f"ours {dtype} {m}"] = engine
            model = engine.model
    first_ar = f"ours {dtypes[0]} ar"
    ar = engines[first_ar]
    prompts = [ar.chat_prompt([{"role": "user", "content": text}]) for text in first_turns()]
    stops = set(ar.stop_ids)
    eos = loaded.tokenizer.eos_token_id

    runners = llama_cpp_runners(default_model_path(), args.threads, args.max_new_tokens, stops)
    if not args.no_transformers:
        runners.update(transformers_runners(loaded.folder, args.max_new_tokens, eos))
    runners.update({name: (lambda p, e=e: e.generate(p, SamplingParams(), args.max_new_tokens).output)
                    for name, e in engines.items()})
    for run in runners.values():  # warm-up: first-call allocations and kernel selection
        run(prompts[0][:32])
    totals = {name: [0, 0.0] for name in runners}
    outputs: dict[str, list[list[int]]] = {name: [] for name in runners}
    for i, prompt in enumerate(prompts):
        for name, run in runners.items():  # interleaved: the machine's drift hits every system alike
            t0 = time.perf_counter()
            out = run(prompt)
            totals[name][1] += time.perf_counter() - t0
            totals[name][0] += len(out)
            outputs[name].append(out)
        print(f"\r{i + 1}/{len(prompts)} prompts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rate = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    base = rate.get("llama.cpp plain")
    print(f"{len(prompts)} Spec-Bench prompts (first of {', '.join(PEER_CATEGORIES)}), {args.max_new_tokens} new tokens, "
          f"greedy, {args.threads} threads; CPU: {processor_name()} ({torch.backends.cpu.get_cpu_capability()}); "
          f"ours: " + "; ".join(f"{d} = {engines[f'ours {d} ar'].numerics}" for d in dtypes))
    print(f"{'system':<28} {'tok/s':>7} {'vs llama.cpp':>13} {'vs ' + first_ar:>18} {'same as':>27}")
    rows = []
    for name in runners:
        if name.startswith("ours "):
            ref = name.rsplit(" ", 1)[0] + " ar"
        elif name.startswith("llama.cpp"):
            ref = "ours gguf ar" if "gguf" in dtypes else first_ar
        else:
            ref = "ours float32 ar" if "float32" in dtypes else first_ar
        same = sum(a == b for a, b in zip(outputs[name], outputs[ref]))
        vs_llama = f"{rate[name] / base:.2f}x" if base else "-"
        print(f"{name:<28} {rate[name]:7.1f} {vs_llama:>13} {rate[name] / rate[first_ar]:17.2f}x "
              f"{same:>3}/{len(prompts)} {ref:>21}")
        rows.append({"system": name, "tokens": totals[name][0], "seconds": round(totals[name][1], 3),
                     "tok_s": round(rate[name], 2), "same_as": ref, "same": same})
    if args.json:
        args.json.write_text(json.dumps({"prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                                         "threads": args.threads, "cpu": processor_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
